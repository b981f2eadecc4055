"""Time the per-matrix spectral methods (TSV, Iso-C, Iso-CTS) on TinyLlama-shaped units (not a test).

For each matrix shape of the 1.1B bench model, times one call of each method with two task vectors (random
bf16-scale inputs, float32 math) and, with --exact, one float32 LAPACK SVD of that shape for comparison. Prints
JSON with the load average. Whole-model cost = the sum over the model's matrices (22 layers x q, k, v, o, gate,
up, down, plus the embedding and the LM head).

    python tools/bench_spectral.py [--shapes 2048x5632,2048x2048] [--methods tsv,iso_c] [--exact]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# (rows, cols) of the TinyLlama matrices and how many the model has
MODEL = {(2048, 2048): 44, (256, 2048): 44, (2048, 5632): 44, (5632, 2048): 22, (32000, 2048): 2}


def main() -> int:
    from ptm.merge import methods as M

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x5632,2048x2048,256x2048")
    ap.add_argument("--methods", default="iso_c,tsv,iso_cts")
    ap.add_argument("--exact", action="store_true", help="also time np.linalg.svd (float32) per shape")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    out: dict = {"load_start": os.getloadavg()[0], "seconds": {}}
    for spec in a.shapes.split(","):
        shape = tuple(int(x) for x in spec.split("x"))
        pre = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
        x = {"pre": pre, "skills": [pre + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.002)
                                    for _ in range(2)]}
        row = {}
        for m in a.methods.split(","):
            t0 = time.perf_counter()
            getattr(M, m)(x, [], M.Context())
            row[m] = round(time.perf_counter() - t0, 2)
        if a.exact:
            t0 = time.perf_counter()
            np.linalg.svd(x["skills"][0] - pre, full_matrices=False)
            row["np.linalg.svd_f32"] = round(time.perf_counter() - t0, 2)
        out["seconds"][spec] = row
        print(spec, row, flush=True)
    out["load_end"] = os.getloadavg()[0]
    have = {tuple(int(v) for v in k.split("x")) for k in out["seconds"]}
    if have >= {s for s in MODEL if s != (32000, 2048)} - {(5632, 2048)}:
        est = {}
        for m in a.methods.split(","):
            per = {s: out["seconds"][f"{s[0]}x{s[1]}"][m] for s in have}
            per.setdefault((5632, 2048), per[(2048, 5632)])  # the transpose costs the same
            est[m] = round(sum(n * per[s] for s, n in MODEL.items() if s in per), 1)
        out["whole_model_estimate_s_without_embeddings"] = est
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
