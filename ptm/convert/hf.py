"""Hugging Face Llama (safetensors) <-> ptm model checkpoints, streaming one tensor at a time.

Name and layout mapping (HF stores `nn.Linear` weights as [out, in]; ptm as [in, out...], layers stacked):

| HF (per layer i)                               | ptm                                   |
|------------------------------------------------|---------------------------------------|
| model.embed_tokens.weight [V, E]               | embed.embedding [V, E]                |
| model.layers.i.self_attn.q_proj.weight [H*D, E]| layers.attention.wq [L, E, H, D]      |
| ...k_proj / v_proj [KV*D, E]                   | layers.attention.wk / wv [L, E, KV, D]|
| ...o_proj [E, H*D]                             | layers.attention.wo [L, H, D, E]      |
| ...mlp.gate_proj / up_proj [M, E]              | layers.mlp.w_gate / w_up [L, E, M]    |
| ...mlp.down_proj [E, M]                        | layers.mlp.w_down [L, M, E]           |
| ...input_layernorm / post_attention_layernorm  | layers.attention_norm / mlp_norm.scale|
| model.norm.weight                              | final_norm.scale                      |
| lm_head.weight [V, E]                          | lm_head.kernel [E, V] (absent if tied)|

RoPE: ptm's `rope` uses HF's `rotate_half` layout (the two halves of each head are the rotation pairs), so q/k
need no permutation — only the reshape of the fused head dimension. (Meta's original `consolidated.pth`
weights use interleaved pairs and would; they are not accepted here, convert them with transformers first.)

Vocabulary: Llama 2 has 32000 tokens; instruction-tuned derivatives often add a pad token (32001 or 32002
rows). Merging needs equal shapes, so `resize_vocab=N` grows the embedding and LM head to N rows, filling new
rows with the mean of the existing ones (a neutral start for a token the model never produced). Shrinking is
refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import tree
from ptm.ckpt.dtypes import dtype_name, parse_dtype
from ptm.ckpt.stores import OrbaxStore, SafetensorsStore, TensorInfo
from ptm.ckpt.writers import OrbaxWriter, SafetensorsWriter, chunk_shape
from ptm.errors import CheckpointError, ConfigError
from ptm.model.config import ModelConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
_IGNORED_HF = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed by both sides
# --------------------------------------------------------------------------------------------- config mapping


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a HF Llama `config.json` dict; refuses features ptm's model does not implement."""
    mt = hf.get("model_type")
    if mt != "llama":
        raise CheckpointError(f"{where}: model_type={mt!r}; only 'llama' (Llama 2, Tulu 2, ...) is supported")
    problems = []
    if (
        hf.get("rope_scaling") not in (None, {})
        and (hf["rope_scaling"] or {}).get("rope_type", "default") != "default"
    ):
        problems.append(f"rope_scaling={hf['rope_scaling']!r}")
    if (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        problems.append(f"rope_parameters={hf['rope_parameters']!r}")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}")
    if problems:
        raise CheckpointError(f"{where}: unsupported Llama options: {', '.join(problems)}")
    try:
        heads = int(hf["num_attention_heads"])
        embed = int(hf["hidden_size"])
        theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            embed_dim=embed,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or embed // heads),
            mlp_dim=int(hf["intermediate_size"]),
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from e
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def config_to_hf(cfg: ModelConfig, dtype: np.dtype, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """HF `config.json` for `cfg`; `base` (e.g. the original config.json) supplies token ids and the like."""
    out = dict(base or {})
    out.update(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.embed_dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.mlp_dim,
            "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": dtype_name(dtype),
        }
    )
    out.pop("rope_parameters", None)
    out.setdefault("bos_token_id", 1)
    out.setdefault("eos_token_id", 2)
    out.setdefault("rope_scaling", None)
    return out


# --------------------------------------------------------------------------------------------- tensor mapping


@dataclass(frozen=True)
class _Spec:
    """One ptm tensor and how each of its layer slices comes from / goes to one HF tensor."""

    ptm: str
    hf: str  # with {i} for stacked layers
    to_ptm: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool


def _specs(cfg: ModelConfig) -> list[_Spec]:
    e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ident = lambda a: a
    t = lambda a: a.T
    lp = "model.layers.{i}."
    specs = [_Spec("embed.embedding", "model.embed_tokens.weight", ident, ident, False)]
    specs += [
        _Spec("layers.attention_norm.scale", lp + "input_layernorm.weight", ident, ident, True),
        _Spec(
            "layers.attention.wq",
            lp + "self_attn.q_proj.weight",
            lambda a: a.T.reshape(e, h, d),
            lambda a: a.reshape(e, h * d).T,
            True,
        ),
        _Spec(
            "layers.attention.wk",
            lp + "self_attn.k_proj.weight",
            lambda a: a.T.reshape(e, kv, d),
            lambda a: a.reshape(e, kv * d).T,
            True,
        ),
        _Spec(
            "layers.attention.wv",
            lp + "self_attn.v_proj.weight",
            lambda a: a.T.reshape(e, kv, d),
            lambda a: a.reshape(e, kv * d).T,
            True,
        ),
        _Spec(
            "layers.attention.wo",
            lp + "self_attn.o_proj.weight",
            lambda a: a.T.reshape(h, d, e),
            lambda a: a.reshape(h * d, e).T,
            True,
        ),
        _Spec("layers.mlp_norm.scale", lp + "post_attention_layernorm.weight", ident, ident, True),
        _Spec("layers.mlp.w_gate", lp + "mlp.gate_proj.weight", t, t, True),
        _Spec("layers.mlp.w_up", lp + "mlp.up_proj.weight", t, t, True),
        _Spec("layers.mlp.w_down", lp + "mlp.down_proj.weight", t, t, True),
        _Spec("final_norm.scale", "model.norm.weight", ident, ident, False),
    ]
    if not cfg.tie_embeddings:
        specs.append(_Spec("lm_head.kernel", "lm_head.weight", t, t, False))
    return specs


def _hf_shape(spec: _Spec, cfg: ModelConfig) -> tuple[int, ...]:
    shape = tree.shapes(cfg)[spec.ptm][1 if spec.stacked else 0 :]
    return tuple(spec.to_hf(np.empty(shape, np.int8)).shape)


def _hf_names(spec: _Spec, cfg: ModelConfig) -> list[str]:
    return [spec.hf.format(i=i) for i in range(cfg.num_layers)] if spec.stacked else [spec.hf]


# -------------------------------------------------------------------------------------------------- hf -> ptm


def _read_json(path: str) -> dict[str, Any]:
    p = epath.Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: not found")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Append rows equal to the mean of the existing rows (computed in fp32)."""
    mean = a.astype(np.float32).mean(axis=0, keepdims=True).astype(a.dtype)
    return np.concatenate([a, np.repeat(mean, rows - a.shape[0], axis=0)], axis=0)


def hf_to_ptm(
    src: str,
    dst: str,
    *,
    dtype: str = "float32",
    resize_vocab: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ModelConfig:
    """Convert a HF Llama safetensors dir (local or gs://; one file or sharded with an index) into a ptm model
    checkpoint at `dst` (local or gs://). Reads and writes one tensor at a time. Returns the ModelConfig."""
    src = str(src).rstrip("/")
    hf_cfg = _read_json(f"{src}/config.json")
    cfg = config_from_hf(hf_cfg, f"{src}/config.json")
    out_dt = parse_dtype(dtype)
    store = SafetensorsStore(src)
    have = store.tensors()
    specs = _specs(cfg)

    # Check names and shapes of everything before writing anything.
    expected: dict[str, tuple[int, ...]] = {}
    for sp in specs:
        for n in _hf_names(sp, cfg):
            expected[n] = _hf_shape(sp, cfg)
    problems = [f"missing tensor {n!r}" for n in expected if n not in have]
    problems += [
        f"tensor {n!r} has shape {list(have[n].shape)}, config.json implies {list(s)}"
        for n, s in expected.items()
        if n in have and tuple(have[n].shape) != s
    ]
    extra = [
        n
        for n in have
        if n not in expected
        and not n.endswith(_IGNORED_HF)
        and not (cfg.tie_embeddings and n == "lm_head.weight")
    ]
    problems += [f"unexpected tensor {n!r}" for n in extra]
    if problems:
        raise CheckpointError(
            f"{src}: not a Llama checkpoint matching its config.json:\n  " + "\n  ".join(problems)
        )

    vocab = cfg.vocab_size
    if resize_vocab is not None:
        if resize_vocab < vocab:
            raise ConfigError(
                f"resize_vocab={resize_vocab} is smaller than the checkpoint's vocabulary {vocab} "
                f"({src}); shrinking would drop tokens"
            )
        vocab = resize_vocab
    out_cfg = ModelConfig.from_dict(
        {**cfg.to_dict(), "vocab_size": vocab, "param_dtype": dtype_name(out_dt)}
    )

    shapes = tree.shapes(out_cfg)
    infos = [TensorInfo(n, shapes[n], out_dt) for n in sorted(shapes)]
    # Per-layer chunks (<= 256 MiB): each layer slice is written on its own, never the whole stack in memory.
    chunks = {}
    for i in infos:
        per = (1, *i.shape[1:]) if i.name.startswith("layers.") else i.shape
        chunks[i.name] = chunk_shape(per, out_dt.itemsize, 256 << 20)
    writer = OrbaxWriter(dst, infos, chunks, {}, overwrite, inputs=[src])
    writer.prepare(is_leader=True)
    bar = _bar(sum(len(_hf_names(sp, cfg)) for sp in specs), "hf-to-ptm", progress)
    try:
        writer.open()
        for sp in specs:
            for li, n in enumerate(_hf_names(sp, cfg)):
                a = sp.to_ptm(np.asarray(store.read(n, (slice(None),) * len(have[n].shape))))
                if sp.ptm in ("embed.embedding",) and vocab != cfg.vocab_size:
                    a = _pad_rows(a, vocab)
                elif sp.ptm == "lm_head.kernel" and vocab != cfg.vocab_size:
                    a = _pad_rows(a.T, vocab).T
                a = np.ascontiguousarray(a, dtype=out_dt)
                idx = (slice(li, li + 1),) if sp.stacked else ()
                writer.write(sp.ptm, idx + (slice(None),) * a.ndim, a[None] if sp.stacked else a)
                bar.update(1)
        meta = ckpt_format.make_meta(
            out_cfg.to_dict(),
            step=0,
            provenance={
                "converted_from": src,
                "hf_config": hf_cfg,
                "resize_vocab": resize_vocab,
                "tool": "ptm convert hf-to-ptm",
            },
        )
        writer.commit(meta, is_leader=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return out_cfg


# -------------------------------------------------------------------------------------------------- ptm -> hf


def _infer_config(shapes: dict[str, tuple[int, ...]], where: str) -> ModelConfig:
    """A ModelConfig from tensor shapes alone (bare Orbax checkpoints without ptm/metadata)."""
    try:
        L, E, H, D = shapes["layers.attention.wq"]
        KV = shapes["layers.attention.wk"][2]
        M = shapes["layers.mlp.w_gate"][2]
        V = shapes["embed.embedding"][0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: not a ptm Llama parameter tree ({e})") from e
    return ModelConfig(
        vocab_size=V,
        embed_dim=E,
        num_layers=L,
        num_heads=H,
        num_kv_heads=KV,
        head_dim=D,
        mlp_dim=M,
        tie_embeddings="lm_head.kernel" not in shapes,
    )


def ptm_to_hf(
    src: str,
    dst: str,
    *,
    dtype: str = "bfloat16",
    tokenizer_from: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Export a ptm model checkpoint (run dir, step dir, merge output or bare Orbax dir; local or gs://) as a
    HF Llama dir: config.json, safetensors shards + model.safetensors.index.json, and the tokenizer files from
    `tokenizer_from`. Holds one stacked ptm tensor at a time in memory; returns the config."""
    store = OrbaxStore(src)
    infos = store.tensors()
    shapes = {n: i.shape for n, i in infos.items()}
    if store.meta is not None:
        cfg = ckpt_format.model_config(store.meta, src)
    else:
        cfg = _infer_config(shapes, src)
    want = tree.shapes(cfg)
    problems = [f"missing tensor {n!r}" for n in want if n not in shapes]
    problems += [
        f"tensor {n!r} has shape {list(shapes[n])}, the model config implies {list(s)}"
        for n, s in want.items()
        if n in shapes and tuple(shapes[n]) != s
    ]
    problems += [f"unexpected tensor {n!r}" for n in shapes if n not in want]
    if problems:
        raise CheckpointError(f"{src}: parameters do not match the model config:\n  " + "\n  ".join(problems))
    out_dt = parse_dtype(dtype)

    base = None
    if tokenizer_from:
        tf = str(tokenizer_from).rstrip("/")
        if epath.Path(f"{tf}/config.json").exists():
            base = _read_json(f"{tf}/config.json")
        if not any(epath.Path(f"{tf}/{f}").exists() for f in TOKENIZER_FILES):
            raise CheckpointError(f"{tf}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    hf_cfg = config_to_hf(cfg, out_dt, base)

    specs = _specs(cfg)
    plan = [(sp, n, _hf_shape(sp, cfg)) for sp in specs for n in _hf_names(sp, cfg)]
    writer = SafetensorsWriter(dst, [TensorInfo(n, s, out_dt) for _, n, s in plan], overwrite,
                               max_shard_bytes=max_shard_bytes, inputs=[src])
    extra = {"config.json": json.dumps(hf_cfg, indent=2).encode()}
    for f in TOKENIZER_FILES if tokenizer_from else ():
        p = epath.Path(str(tokenizer_from).rstrip("/")) / f
        if p.exists():
            extra[f] = p.read_bytes()
    if not tokenizer_from:
        extra.update(_recorded_tokenizer_files(store.meta, src))
    bar = _bar(len(plan), "ptm-to-hf", progress)
    writer.prepare()
    try:
        writer.open()
        for sp in specs:
            full = store.read(sp.ptm, (slice(None),) * len(shapes[sp.ptm]))
            for li, n in enumerate(_hf_names(sp, cfg)):
                a = full[li] if sp.stacked else full
                writer.write(n, (), np.ascontiguousarray(sp.to_hf(np.asarray(a)), dtype=out_dt))
                bar.update(1)
            del full
        writer.commit(extra_files=extra)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return hf_cfg


def _recorded_tokenizer_files(meta: dict[str, Any] | None, src: str) -> dict[str, bytes]:
    """The tokenizer file named in the checkpoint's metadata (a SentencePiece `.model` or a `tokenizer.json`),
    under the name Hugging Face loaders look for; nothing for the built-in byte tokenizer."""
    tok = (meta or {}).get("tokenizer")
    if not tok or tok == "byte":
        return {}
    p = epath.Path(tok)
    if not p.exists():
        raise CheckpointError(f"{src}: its metadata names tokenizer {tok!r}, which does not exist; pass "
                              "--tokenizer-from DIR")
    name = "tokenizer.json" if p.name.endswith(".json") else "tokenizer.model"
    return {name: p.read_bytes()}


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=None)
