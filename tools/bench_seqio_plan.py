"""Planning cost of a seqio LM source per host: before (every host planned all P hosts' shards) vs after (each
host plans its own shard; the hosts exchange counts, a few integers per batch).

    /work/seqio-venv/bin/python tools/bench_seqio_plan.py [--docs 20000] [--hosts 1,2,4,8] [--seq-len 256]

Registers a targets-only Task over a generated text file (ByteVocabulary; `--files` text files, so seqio shards
by file once hosts <= files, else every P-th example) and, for each host count P, times one pass of host 0's
input pipeline (`seqio_source.plan_counts`, the after cost) and of all P passes (the before cost) with the same
global batch. Needs the `seqio` extra.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--hosts", default="1,2,4,8")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    args = ap.parse_args()

    from ptm.data import seqio_source
    from ptm.data.pipeline import DataConfig, SourceConfig

    seqio = seqio_source.seqio_module()
    d = tempfile.mkdtemp(prefix="ptm-bench-seqio-")
    r = random.Random(0)
    words = "alpha beta gamma delta river stone cloud light seven orbit quiet amber".split()
    files = []
    for f in range(args.files):
        path = os.path.join(d, f"part{f}.txt")
        with open(path, "w") as fh:
            for _ in range(args.docs // args.files):
                fh.write(" ".join(r.choice(words) for _ in range(r.randint(5, 60))) + "\n")
        files.append(path)
    vocab = seqio.ByteVocabulary()
    seqio.TaskRegistry.add(
        "bench_lm", source=seqio.TextLineDataSource({"train": files}),
        preprocessors=[lambda ds: ds.map(lambda x: {"targets": x}), seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})
    cfg = DataConfig(sources=[SourceConfig("seqio:bench_lm")], seq_len=args.seq_len, global_batch_size=args.batch)
    tfl = {"targets": args.seq_len}
    print(f"{args.docs} docs in {args.files} files, seq_len {args.seq_len}, global batch {args.batch}")
    seqio_source.plan_counts(cfg, "bench_lm", tfl, 0, 1)  # warm-up (tf.data start-up, file cache)
    print(f"{'hosts':>5} {'batches/host':>12} {'after: own shard s':>18} {'before: all shards s':>20} {'ratio':>6}")
    for p in (int(x) for x in args.hosts.split(",")):
        t = time.perf_counter()
        own = seqio_source.plan_counts(cfg, "bench_lm", tfl, 0, p)
        t_own = time.perf_counter() - t
        t = time.perf_counter()
        for shard in range(p):
            seqio_source.plan_counts(cfg, "bench_lm", tfl, shard, p)
        t_all = time.perf_counter() - t
        print(f"{p:>5} {len(own):>12} {t_own:>18.2f} {t_all:>20.2f} {t_all / t_own:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
