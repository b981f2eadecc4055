"""`ptm convert hf-to-ptm | ptm-to-hf`: Hugging Face Llama safetensors <-> ptm model checkpoints."""

from __future__ import annotations

import argparse
import sys

from ptm.errors import ConfigError


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB)") from e


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert between Hugging Face Llama and ptm checkpoints")
    sub = p.add_subparsers(dest="direction", required=True)

    a = sub.add_parser("hf-to-ptm", help="HF Llama safetensors dir (local or gs://) -> ptm model checkpoint")
    a.add_argument("src", help="HF model dir with config.json and model.safetensors[.index.json]")
    a.add_argument("dst", help="output ptm checkpoint dir (params/ + ptm/metadata)")
    a.add_argument(
        "--dtype", default="float32", help="stored parameter dtype (float32 = ptm's training default)"
    )
    a.add_argument(
        "--resize-vocab",
        type=int,
        metavar="N",
        help="grow embedding and LM head to N rows, new rows = mean of the old ones "
        "(e.g. 32000 -> 32001 to merge Llama 2 with Tulu 2)",
    )
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=_hf_to_ptm)

    b = sub.add_parser(
        "ptm-to-hf", help="ptm checkpoint (run/step/merge dir, local or gs://) -> HF safetensors"
    )
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument(
        "--tokenizer-from", metavar="HF_DIR", help="copy tokenizer files (and token ids) from here"
    )
    b.add_argument("--max-shard-size", type=_size, default=5 * 10**9, metavar="SIZE")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_ptm_to_hf)


def _hf_to_ptm(args) -> int:
    from ptm.convert.hf import hf_to_ptm

    cfg = hf_to_ptm(
        args.src,
        args.dst,
        dtype=args.dtype,
        resize_vocab=args.resize_vocab,
        overwrite=args.overwrite,
        progress=True,
    )
    print(
        f"wrote {args.dst}: {cfg.num_layers} layers, embed {cfg.embed_dim}, vocab {cfg.vocab_size}",
        file=sys.stderr,
    )
    return 0


def _ptm_to_hf(args) -> int:
    from ptm.convert.hf import ptm_to_hf

    if args.max_shard_size <= 0:
        raise ConfigError("--max-shard-size must be positive")
    ptm_to_hf(
        args.src,
        args.dst,
        dtype=args.dtype,
        tokenizer_from=args.tokenizer_from,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite,
        progress=True,
    )
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0
