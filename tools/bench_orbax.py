"""Orbax input costs, isolated from the merge (not a test).

    python tools/bench_orbax.py read [--tensorstore] IN1 IN2 IN3  # read every tensor as the merge engine does
    python tools/bench_orbax.py check IN1 [IN2 ...]   # mapped reads == tensorstore reads, every tensor, bit for bit
    python tools/bench_orbax.py save DIR              # RunCheckpointer saves of the 1.1B bench tree, zstd vs raw

`read`: the engine's pieces in its order, each input's next piece requested one ahead, summed in float32;
prints wall and CPU seconds (user + system), minor page faults and peak private memory (RssAnon). Works for
safetensors and Orbax inputs alike (compare tools/bench_merge.py's inputs under --dir: st/, ox/ = zstd params,
oxu/ = uncompressed params). `--tensorstore`: Orbax inputs read only through tensorstore, not served from the
mapped files (ptm.ckpt.mapped), for a before/after on the same inputs; the last figure printed is how many
tensors were mapped. `save`: two rounds of a synchronous save with zstd params and without, with the size on
disk; DIR is deleted afterwards.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time

import numpy as np


def read(paths: list[str]) -> None:
    from ptm.ckpt import stores as S
    from ptm.ckpt import writers as W
    from ptm.merge.engine import PIECE_BYTES, pieces

    mapped = "--tensorstore" not in paths
    paths = [p for p in paths if p != "--tensorstore"]
    st = [S.open_store(p) for p in paths]
    st = [S.OrbaxStore(p, mapped=False) if isinstance(s, S.OrbaxStore) and not mapped else s
          for p, s in zip(paths, st, strict=True)]
    infos = st[0].tensors()
    for s in st[1:]:
        s.tensors()
    work = [(n, p) for n, i in infos.items()
            for p in pieces(tuple(slice(0, d) for d in i.shape), W.chunk_shape(i.shape, 4, PIECE_BYTES))]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    nxt = [s.read_async(*work[0]) for s in st]
    anon = 0
    for w in range(len(work)):
        cur = [f.result() for f in nxt]
        if w + 1 < len(work):
            nxt = [s.read_async(*work[w + 1]) for s in st]
        acc = cur[0].astype(np.float32)
        for c in cur[1:]:
            acc += c
        with open("/proc/self/status") as f:
            anon = max([anon] + [int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:")])
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    print(f"wall {time.perf_counter() - t0:.1f} s  cpu {cpu:.1f} s (system {r1.ru_stime - r0.ru_stime:.1f})  "
          f"minor faults {(r1.ru_minflt - r0.ru_minflt) / 1e6:.2f}M  peak private {anon / 1e9:.2f} GB  "
          f"load {os.getloadavg()[0]:.1f}  mapped tensors "
          f"{sum(len(s.mapped()) for s in st if isinstance(s, S.OrbaxStore))}")


def check(paths: list[str]) -> None:
    from ptm.ckpt import stores as S

    for p in paths:
        fast, ref = S.OrbaxStore(p), S.OrbaxStore(p, mapped=False)
        infos = fast.tensors()
        differ = [n for n in infos if np.asarray(fast.read(n, ())).tobytes() != np.asarray(ref.read(n, ())).tobytes()]
        print(f"{p}: {len(infos)} tensors, {len(fast.mapped())} mapped, "
              f"{sum(i.nbytes for i in infos.values()) / 1e9:.2f} GB compared, differing: {differ or 'none'}",
              flush=True)
        if differ:
            sys.exit(1)


def save(d: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_merge

    for comp in (True, False, True, False):
        shutil.rmtree(d, ignore_errors=True)
        took = bench_merge.gen_orbax(d, 0, comp)
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        print(f"{'zstd' if comp else 'raw '} params: save {took:.1f} s, {size / 1e9:.2f} GB on disk, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("read", "check", "save"):
        sys.exit(__doc__)
    {"read": read, "check": check, "save": lambda a: save(a[0])}[sys.argv[1]](sys.argv[2:])
