"""Exact k-th largest |x| of a stream of blocks in one pass (usually), for the sparse methods' per-unit
thresholds: the first block's sample brackets each wanted rank, the pass counts the entries above the bracket and
keeps the few inside it (their bit patterns and where they are), and the k-th largest is picked among those. A
bracket that misses (a first block unlike the rest) or that would hold too many entries makes `AbsSelect.value`
return None; the caller then runs the exact two-pass radix selection (`kth_largest_abs`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

SAMPLE = 1 << 16  # entries of the first block the brackets are estimated from
SUB = 1 << 15  # entries per cache-sized sub-block of a piece (32K: 4x faster than 64K, measured)
MARGIN = 0.01  # rank fraction added on each side of a bracket, beyond 5 standard errors of the sample quantile
MAX_KEPT = 0.25  # a bracket holding more than this fraction of the entries is given up (many equal values)


def abs_bits(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """|x| of a float32 array as its uint32 bit patterns (for non-negative floats they order like the values)."""
    return np.bitwise_and(np.ascontiguousarray(x, np.float32).reshape(-1).view(np.uint32),
                          np.uint32(0x7FFFFFFF), out=out)


class AbsSelect:
    """The `ks[j]`-th largest of the |x| fed block by block (`feed` takes `abs_bits` of each block, in stream
    order). With `where=True` every bracket also remembers the block number and position of its entries, so
    `ties` can say where the entries equal to a result are."""

    def __init__(self, n: int, ks: Sequence[int], where: bool = False):
        self.n, self.ks, self.where = n, [int(k) for k in ks], where
        self.br: list[tuple[int, int]] | None = None  # per k: (lo, hi) bit patterns, lo <= hi
        self.above = [0] * len(self.ks)  # entries > hi
        self.vals: list[list[np.ndarray]] = [[] for _ in self.ks]
        self.locs: list[list[tuple[int, np.ndarray]]] = [[] for _ in self.ks]
        self.kept = [0] * len(self.ks)
        self.blocks = 0
        self.failed = [not 1 <= k <= n for k in self.ks]

    def prime(self, sample: np.ndarray) -> None:
        """Set the brackets from a sample of the |x| bit patterns (e.g. a strided sample of the first block)."""
        step = max(1, sample.size // SAMPLE)
        s = np.sort(sample[::step])[::-1]  # descending
        m = s.size
        self.br = []
        for k in self.ks:
            f = min(max(k / self.n, 0.0), 1.0)
            d = 5 * math.sqrt(f * (1 - f) / m) + MARGIN
            r_hi, r_lo = math.floor((f - d) * m) - 1, math.ceil((f + d) * m)
            hi = int(s[r_hi]) if r_hi >= 0 else 0xFFFFFFFF
            lo = int(s[r_lo]) if r_lo < m else 0
            self.br.append((lo, hi))

    def feed(self, ab: np.ndarray, block: int | None = None, offset: int = 0) -> None:
        """Count and keep one block's entries (`ab`: flat |x| bit patterns). With `where`, entry i is recorded as
        (block, offset + i); block defaults to the number of blocks fed before."""
        if self.br is None:
            self.prime(ab)
        cap = max(MAX_KEPT * self.n, 1 << 20)
        for j, (lo, hi) in enumerate(self.br):
            if self.failed[j]:
                continue
            if hi < 0xFFFFFFFF:
                self.above[j] += int(np.count_nonzero(ab > np.uint32(hi)))
            # lo <= ab <= hi as one unsigned comparison: ab - lo wraps above hi - lo when ab < lo
            inside = np.flatnonzero(np.subtract(ab, np.uint32(lo)) <= np.uint32(hi - lo))
            self.kept[j] += inside.size
            if self.kept[j] > cap:
                self.failed[j] = True
                self.vals[j], self.locs[j] = [], []
                continue
            self.vals[j].append(ab[inside])
            if self.where:
                self.locs[j].append((self.blocks if block is None else block, inside + offset))
        self.blocks += 1

    def value(self, j: int) -> int | None:
        """The bit pattern of the ks[j]-th largest, or None (the bracket missed: use the radix selection)."""
        if self.failed[j] or self.br is None:
            return None
        need = self.ks[j] - self.above[j]  # rank among the bracket's entries, from the top
        if not 1 <= need <= self.kept[j]:
            return None
        v = np.concatenate(self.vals[j])
        return int(np.partition(v, v.size - need)[v.size - need])

    def ties(self, j: int, bits: int) -> tuple[int, list[tuple[int, np.ndarray]]]:
        """For a found value: how many entries are above it, and (block, positions) of the entries equal to it."""
        v = self.vals[j]
        above = self.above[j] + sum(int(np.count_nonzero(a > np.uint32(bits))) for a in v)
        eq = [(b, pos[a == np.uint32(bits)]) for a, (b, pos) in zip(v, self.locs[j], strict=True)]
        return above, [(b, p) for b, p in eq if p.size]


def sample(x: np.ndarray) -> np.ndarray:
    """A strided sample (~SAMPLE entries) of a block's |x| bit patterns, for `AbsSelect.prime`."""
    flat = x.reshape(-1)
    return abs_bits(flat[:: max(1, flat.size // SAMPLE)])


def sub_blocks(n: int, size: int = SUB) -> list[slice]:
    """Cache-sized slices of n entries: chains of ufuncs over them stay in cache (whole 16 MiB pieces do not)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def as_float(bits: int) -> float:
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def exact_cutoff(above: int, k: int, ties: list[tuple[int, np.ndarray]],
                 flat: Callable[[int], np.ndarray]) -> int:
    """mergekit's exact-k trim: the largest flat index among the entries equal to the threshold that are kept
    (lowest flat indices first, k - above of them), or -1 when none is. `flat(b)` is block b's flat indices
    (called once per block)."""
    need = k - above
    if need <= 0:
        return -1
    by_block: dict[int, list[np.ndarray]] = {}
    for b, p in ties:
        by_block.setdefault(b, []).append(p)
    idx = np.sort(np.concatenate([flat(b).reshape(-1)[np.concatenate(ps)] for b, ps in by_block.items()])
                  .astype(np.uint64))
    return int(idx[need - 1])
