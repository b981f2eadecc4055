"""What vocabulary surgery costs (not a test): three inputs with TinyLlama's embedding and LM head (32000 x 2048,
bf16, HF names, safetensors), one of them with 2 added tokens (32002 rows) and one with permuted token ids,
merged by task arithmetic with `tokenizer = "union"`, against the same merge of three same-vocabulary inputs
without surgery, and the union with mergekit's `tokens` overrides (a forced row, a zero row, an added token) and
`pad_to_multiple_of = 64`. Prints wall seconds and peak RSS of each (fresh subprocesses).

    python tools/bench_vocab.py --dir /tmp/ptm-vocab-bench [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

VOCAB, HIDDEN = 32000, 2048


def _tokenizer(path: str, words: list[str], added: list[str]) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(a, special=True, normalized=False) for a in added])
    tk.save(f"{path}/tokenizer.json")


def _model(path: str, seed: int, words: list[str], added: list[str]) -> None:
    """A bf16 safetensors file (embedding + head), written directly (safetensors.numpy has no bf16)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = len(words) + len(added)
    blobs = [rng.standard_normal((n, HIDDEN), np.float32).astype(ml_dtypes.bfloat16).tobytes() for _ in range(2)]
    header = {k: {"dtype": "BF16", "shape": [n, HIDDEN], "data_offsets": [i * len(b), (i + 1) * len(b)]}
              for i, (k, b) in enumerate(zip(("model.embed_tokens.weight", "lm_head.weight"), blobs, strict=True))}
    raw = json.dumps(header).encode()
    with open(f"{path}/model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    _tokenizer(path, words, added)


def _run(d: str, case: str) -> dict[str, float]:
    code = f"""
import resource, time, json
from ptm.merge import engine
from ptm.merge.recipe import Recipe
d = {d!r}
case = {case!r}
names = ["b", "c", "p"] if case != "plain" else ["b", "b2", "b3"]
tok = {{"plain": None, "union": "union", "tokens+pad": {{"source": "union", "pad_to_multiple_of": 64, "tokens": {{
    "t5": {{"source": f"{{d}}/c", "force": True}}, "<|im_end|>": {{"source": {{"kind": "zero"}}}},
    "<new>": {{"source": {{"kind": "model_token", "model": f"{{d}}/p", "token": "t7"}}}}}}}}}}[case]
r = Recipe("task_arithmetic", {{"pre": f"{{d}}/{{names[0]}}", "skills": [f"{{d}}/{{n}}" for n in names[1:]]}},
           weights=[0.5, 0.3], out=f"{{d}}/out-{case}", tokenizer=tok, output_format="safetensors")
t0 = time.perf_counter()
engine.merge(r, progress=False, summary=False)
print(json.dumps({{"wall_s": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ptm-vocab-bench")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    words = [f"t{i}" for i in range(VOCAB - 2)] + ["<s>", "</s>"]
    specs = {"b": (0, words, []), "c": (1, words, ["<|im_start|>", "<|im_end|>"]), "p": (2, words[::-1], []),
             "b2": (3, words, []), "b3": (4, words, [])}
    t0 = time.perf_counter()
    for name, (seed, w, added) in specs.items():
        if not os.path.exists(f"{a.dir}/{name}/model.safetensors"):
            _model(f"{a.dir}/{name}", seed, w, added)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s ({VOCAB} x {HIDDEN} bf16 embedding + head each)")
    for case in ("plain", "union", "tokens+pad"):
        shutil.rmtree(f"{a.dir}/out-{case}", ignore_errors=True)
        r = _run(a.dir, case)
        print(f"{case:10s}: wall {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
