"""Why model stock / multi-SLERP outputs of ptm and mergekit differ on large tensors (not a test).

For each named tensor of three bf16 safetensors models (base, a, b: the 1.1B bench of tools/bench_merge.py), print
the float32 `torch.linalg.vector_norm` of the task vector a - base next to its exact (float64) value, model
stock's t from float32 torch reductions (what mergekit 0.1.5 computes) and from float64 ones, and how many
elements of ptm's model-stock output (`--ptm DIR`, bf16) lie within one bf16 step of mergekit's formula
evaluated with each t. Needs torch.

    python tools/mergekit_norm_error.py --base /work/bench17/st/pre --a /work/bench17/st/general \
        --b /work/bench17/st/skill --ptm /tmp/ms17 model.embed_tokens.weight model.layers.0.mlp.down_proj.weight
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> int:
    import torch

    from ptm.ckpt.stores import SafetensorsStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--ptm", required=True, help="ptm's model_stock output of base, a, b")
    ap.add_argument("tensors", nargs="+")
    args = ap.parse_args()
    base, sa, sb, out = (SafetensorsStore(p) for p in (args.base, args.a, args.b, args.ptm))
    for name in args.tensors:
        w0, w1, w2 = (torch.from_numpy(np.asarray(s.read(name, ()), np.float32).reshape(-1)) for s in (base, sa, sb))
        o1, o2 = w1 - w0, w2 - w0
        n32 = float(torch.linalg.vector_norm(o1))
        n64 = float(torch.linalg.vector_norm(o1.double()))
        c32 = float((o1 * o2).sum() / (torch.linalg.vector_norm(o1) * torch.linalg.vector_norm(o2)))
        c64 = float((o1.double() @ o2.double()) / (torch.linalg.vector_norm(o1.double())
                                                    * torch.linalg.vector_norm(o2.double())))
        got = torch.from_numpy(np.asarray(out.read(name, ()), np.float32).reshape(-1))
        line = [f"{name} ({w0.numel()} entries): |a - base| float32 {n32:.4f}, exact {n64:.4f} "
                f"({100 * (n32 - n64) / n64:+.3f} %)"]
        for label, c in (("float32", c32), ("exact", c64)):
            t = 2 * c / (1 + c)
            want = (t * ((w1 + w2) / 2) + (1 - t) * w0).to(torch.bfloat16).float()
            step = torch.abs(want) * 2.0 ** -7 + 1e-30
            ok = float((torch.abs(got - want) <= step).double().mean())
            line.append(f"t from {label} cos {t:.6f}: ptm within one bf16 step on {100 * ok:.4f} %")
        print("\n  ".join(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
