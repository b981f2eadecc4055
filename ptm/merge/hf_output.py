"""What makes a safetensors merge output a loadable Hugging Face model: `config.json` (torch_dtype = the output
dtype), `generation_config.json`, the tokenizer files and chat template of the base model (or `hf_source`), and
HF shards with `model.safetensors.index.json` (the writer's `max_shard_bytes`)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ptm.convert.hf import TOKENIZER_FILES

HF_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "chat_template.jinja", "chat_template.json")
DEFAULT_SHARD_BYTES = 5 << 30  # what transformers' save_pretrained uses by default (5 GB)


def _model_dir(path: str) -> str | None:
    """The directory of an HF-layout input (a dir, or the dir of a `.safetensors` file); None when not local."""
    if path.startswith("gs://"):
        return None
    d = path if os.path.isdir(path) else os.path.dirname(path)
    return d if os.path.isfile(os.path.join(d, "config.json")) else None


def source_dir(recipe: Any) -> str | None:
    """Where the output's config and tokenizer come from: `hf_source`, else the base (`pre`), else the first input
    that is an HF model dir."""
    if recipe.hf_source:
        d = _model_dir(recipe.hf_source)
        if d is None:
            from ptm.errors import MergeError

            raise MergeError(f"hf_source {recipe.hf_source!r}: no config.json there (an HF model dir is needed)")
        return d
    cands = ([recipe.inputs["pre"]] if recipe.inputs.get("pre") else []) + recipe.input_paths()
    for p in cands:
        d = _model_dir(p)
        if d:
            return d
    return None


def surgery(stores: list[Any] | None) -> Any:
    """The vocabulary surgery (ptm.merge.vocab.Surgery) the inputs are seen through, or None."""
    return next((s.surgery for s in stores or [] if getattr(s, "surgery", None) is not None), None)


def writes_tokenizer(stores: list[Any] | None) -> bool:
    """Whether the output needs a new tokenizer (a union, or added tokens): only an HF (safetensors) output holds
    one; an Orbax output records an existing tokenizer's path."""
    s = surgery(stores)
    return s is not None and s.files is not None


def _read(d: str, names: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for f in names:
        p = os.path.join(d, f)
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                out[f] = fh.read()
    return out


def extra_files(recipe: Any, out_dtype: np.dtype | None, infos: dict[str, Any] | None = None,
                n_layers: int | None = None, stores: list[Any] | None = None) -> dict[str, bytes]:
    """config.json (+ dtype, and the output's layer count and vocabulary size: a frankenmerge or vocabulary
    surgery changes them), generation config, tokenizer files (the surgery's output tokenizer when there is one)
    and chat template for a safetensors output."""
    out: dict[str, bytes] = {}
    src = source_dir(recipe)
    if src is not None:
        out.update(_read(src, HF_FILES))
    sg = surgery(stores)
    if sg is not None:
        tok_files = [f for f in TOKENIZER_FILES if f not in ("generation_config.json", "chat_template.jinja")]
        for f in tok_files:
            out.pop(f, None)
        out.update(sg.files if sg.files is not None else _read(sg.tokenizer_dir, tuple(tok_files)))
    if "config.json" in out:
        cfg: dict[str, Any] = json.loads(out["config.json"])
        name = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(
            np.dtype(out_dtype).name) if out_dtype is not None else None
        if name:
            for k in ("torch_dtype", "dtype"):
                if k in cfg or k == "torch_dtype":
                    cfg[k] = name
        emb = (infos or {}).get("model.embed_tokens.weight")
        if emb is not None:
            cfg["vocab_size"] = int(emb.shape[0])
        if n_layers and "num_hidden_layers" in cfg:
            cfg["num_hidden_layers"] = int(n_layers)
        out["config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    if recipe.chat_template:
        out["chat_template.jinja"] = recipe.chat_template.encode()
        if "tokenizer_config.json" in out:  # a template inside tokenizer_config.json would take precedence
            tc = json.loads(out["tokenizer_config.json"])
            tc.pop("chat_template", None)
            out["tokenizer_config.json"] = (json.dumps(tc, indent=2) + "\n").encode()
    return out
