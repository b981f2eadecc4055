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
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from ptm import ckpt_format
from ptm.errors import CheckpointError, ConfigError
from ptm.model.llama import ModelConfig

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
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "bf16"):
        return _BF16
    try:
        return np.dtype({"fp32": "float32", "fp16": "float16"}.get(name, name))
    except TypeError as e:
        raise ConfigError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)") from e


def _dtype_name(dt: np.dtype) -> str:
    return "bfloat16" if dt == _BF16 else np.dtype(dt).name


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
            "torch_dtype": _dtype_name(dtype),
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


def ptm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, V, E, H, KV, D, M = (
        cfg.num_layers,
        cfg.vocab_size,
        cfg.embed_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
    )
    s = {
        "embed.embedding": (V, E),
        "layers.attention_norm.scale": (L, E),
        "layers.attention.wq": (L, E, H, D),
        "layers.attention.wk": (L, E, KV, D),
        "layers.attention.wv": (L, E, KV, D),
        "layers.attention.wo": (L, H, D, E),
        "layers.mlp_norm.scale": (L, E),
        "layers.mlp.w_gate": (L, E, M),
        "layers.mlp.w_up": (L, E, M),
        "layers.mlp.w_down": (L, M, E),
        "final_norm.scale": (E,),
    }
    if not cfg.tie_embeddings:
        s["lm_head.kernel"] = (E, V)
    return s


def _hf_shape(spec: _Spec, cfg: ModelConfig) -> tuple[int, ...]:
    shape = ptm_shapes(cfg)[spec.ptm][1 if spec.stacked else 0 :]
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
    from ptm.merge.stores import OrbaxWriter, SafetensorsStore, TensorInfo, chunk_shape

    src = str(src).rstrip("/")
    hf_cfg = _read_json(f"{src}/config.json")
    cfg = config_from_hf(hf_cfg, f"{src}/config.json")
    out_dt = _dtype(dtype)
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
        {**cfg.to_dict(), "vocab_size": vocab, "param_dtype": _dtype_name(out_dt)}
    )

    shapes = ptm_shapes(out_cfg)
    infos = [TensorInfo(n, shapes[n], out_dt) for n in sorted(shapes)]
    # Per-layer chunks (<= 256 MiB): each layer slice is written on its own, never the whole stack in memory.
    chunks = {}
    for i in infos:
        per = (1, *i.shape[1:]) if i.name.startswith("layers.") else i.shape
        chunks[i.name] = chunk_shape(per, out_dt.itemsize, 256 << 20)
    writer = OrbaxWriter(dst, infos, chunks, {}, overwrite)
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
    from ptm.merge.stores import OrbaxStore

    store = OrbaxStore(src)
    infos = store.tensors()
    shapes = {n: i.shape for n, i in infos.items()}
    if store.meta is not None:
        cfg = ModelConfig.from_dict(store.meta["model"])
    else:
        cfg = _infer_config(shapes, src)
    want = ptm_shapes(cfg)
    problems = [f"missing tensor {n!r}" for n in want if n not in shapes]
    problems += [
        f"tensor {n!r} has shape {list(shapes[n])}, the model config implies {list(s)}"
        for n, s in want.items()
        if n in shapes and tuple(shapes[n]) != s
    ]
    problems += [f"unexpected tensor {n!r}" for n in shapes if n not in want]
    if problems:
        raise CheckpointError(f"{src}: parameters do not match the model config:\n  " + "\n  ".join(problems))
    out_dt = _dtype(dtype)

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
    writer = _ShardedSafetensorsWriter(dst, [(n, s) for _, n, s in plan], out_dt, max_shard_bytes, overwrite)
    bar = _bar(len(plan), "ptm-to-hf", progress)
    try:
        for sp in specs:
            full = store.read(sp.ptm, (slice(None),) * len(shapes[sp.ptm]))
            for li, n in enumerate(_hf_names(sp, cfg)):
                a = full[li] if sp.stacked else full
                writer.write(n, np.ascontiguousarray(sp.to_hf(np.asarray(a)), dtype=out_dt))
                bar.update(1)
            del full
        extra = {"config.json": json.dumps(hf_cfg, indent=2)}
        writer.commit(extra, tokenizer_from)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return hf_cfg


class _ShardedSafetensorsWriter:
    """Safetensors shards + index written tensor by tensor in a fixed order (local, or staged locally for gs://).

    Shard boundaries come from the byte sizes up front, so each shard's header is known before its data;
    tensors must then be written in the declared order. The output appears atomically: a local temp dir is
    renamed, and on gs:// the index (which makes the dir loadable) is uploaded last.
    """

    def __init__(
        self,
        path: str,
        tensors: list[tuple[str, tuple[int, ...]]],
        dtype: np.dtype,
        max_shard_bytes: int,
        overwrite: bool,
    ):
        from ptm.merge.stores import _ST_NAMES

        self.path = str(path).rstrip("/")
        self.gcs = self.path.startswith("gs://")
        if self._exists() and not overwrite:
            raise CheckpointError(f"{self.path}: output exists (pass --overwrite to replace it)")
        self._clear_gcs = (
            self.gcs and self._exists()
        )  # gs:// has no rename: the old output goes at first upload
        parent = tempfile.gettempdir() if self.gcs else os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix=".ptm-to-hf-", dir=parent)
        item = dtype.itemsize
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for n, s in tensors:
            nb = math.prod(s) * item
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((n, s))
            size += nb
        k = len(shards)
        self.files = (
            ["model.safetensors"]
            if k == 1
            else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        )
        self.order: Iterator[tuple[int, str]] = iter([(fi, n) for fi, sh in enumerate(shards) for n, _ in sh])
        self.shards, self.dtype, self.st_dtype = shards, dtype, _ST_NAMES[dtype]
        self.weight_map = {n: self.files[fi] for fi, sh in enumerate(shards) for n, _ in sh}
        self.total = sum(math.prod(s) * item for _, s in tensors)
        self._fi = -1
        self._fh = None

    def _exists(self) -> bool:
        if self.gcs:
            from ptm.merge.stores import _gcsfs

            return _gcsfs().exists(self.path)
        return os.path.lexists(self.path)

    def _open_shard(self, fi: int) -> None:
        self._close_shard()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for n, s in self.shards[fi]:
            nb = math.prod(s) * self.dtype.itemsize
            header[n] = {"dtype": self.st_dtype, "shape": list(s), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(os.path.join(self.work, self.files[fi]), "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fi = fi

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self.gcs and len(self.files) > 1:  # upload finished shards as we go; the index goes last
                name = self.files[self._fi]
                self._put(name)
                os.remove(os.path.join(self.work, name))

    def _put(self, name: str) -> None:
        from ptm.merge.stores import _gcsfs

        fs = _gcsfs()
        if self._clear_gcs:
            fs.rm(self.path, recursive=True)
            self._clear_gcs = False
        fs.put(os.path.join(self.work, name), f"{self.path}/{name}")

    def write(self, name: str, arr: np.ndarray) -> None:
        fi, expected = next(self.order)
        if name != expected:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {expected!r})")
        if fi != self._fi:
            self._open_shard(fi)
        self._fh.write(arr.tobytes())

    def commit(self, extra_files: dict[str, str], tokenizer_from: str | None) -> None:
        self._close_shard()
        for n, text in extra_files.items():
            with open(os.path.join(self.work, n), "w") as f:
                f.write(text)
        if tokenizer_from:
            for f in TOKENIZER_FILES:
                p = epath.Path(str(tokenizer_from).rstrip("/")) / f
                if p.exists():
                    (epath.Path(self.work) / f).write_bytes(p.read_bytes())
        if len(self.files) > 1:
            with open(os.path.join(self.work, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2
                )
        if self.gcs:
            last = [
                n
                for n in ("model.safetensors.index.json", "model.safetensors")
                if os.path.exists(os.path.join(self.work, n))
            ]
            for n in [n for n in sorted(os.listdir(self.work)) if n not in last] + last:
                self._put(n)
            shutil.rmtree(self.work, ignore_errors=True)
            return
        if os.path.lexists(self.path):
            old = self.work + ".old"
            os.rename(self.path, old)
            os.rename(self.work, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.work, self.path)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.work, ignore_errors=True)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=None)
