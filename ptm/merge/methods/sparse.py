"""Sparsifying methods: TIES, DARE, DARE-TIES, Model Breadcrumbs, DELLA and SCE (trim / drop / rank task-vector
entries, optionally elect signs), with whole-unit statistics so a sharded merge equals the unsharded one."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ptm.errors import MergeError
from ptm.merge.methods.base import (
    _GTA,
    Arrays,
    Context,
    Method,
    Run,
    _anchor,
    _consensus_sum,
    _count,
    _f32,
    _flat,
    _per,
    _stream_taus,
    _taus,
    and_mask,
    as_matrix,
    flat_run,
    ge_mask,
    keep_mask,
    kth_largest_abs,
    merge_threads,
    register,
    uniform_from_index,
)
from ptm.merge.methods.select import SAMPLE, SUB, AbsSelect, abs_bits, as_float, exact_cutoff, sub_blocks


def ties(x: Arrays, w: list[float], ctx: Context, density: Any = 1.0, normalize: bool = True,
         convention: str = "ptm", general_weight: float = 1.0) -> np.ndarray:
    """TIES: trim each task vector to its top-`density` magnitudes, elect the sign of the weighted sum, and take
    the (weight-)mean of the entries that agree with it. Weights are applied before the vote (as mergekit does).
    convention "ptm": keep every |tau| >= the ceil(density n)-th largest, no sign on a zero vote; "mergekit": keep
    exactly int(density n) entries per unit (ties at the threshold: lowest flat index first), "+" on a zero vote."""
    if convention == "mergekit":
        run = flat_run(ctx.flat_index, 0, x["pre"].size)
        flat = _Lazy(lambda: _flat(ctx, x["pre"]).reshape(-1))

        def at(pos: np.ndarray) -> np.ndarray:  # flat indices of positions (a run: no index array)
            return pos.astype(np.uint64) + np.uint64(run.start) if run is not None else flat()[pos]

        taus = [_trim_exact(t, thr, cut, at) for t, (thr, cut) in zip(_taus(x), ctx.unit["exact"], strict=True)]
        return _anchor(x, general_weight) + _consensus_sum(taus, w, True, normalize, "mergekit")
    thr = ctx.stats.get("thresholds") or [0.0] * len(x["skills"])
    taus = []
    for tau, t in zip(_taus(x), thr, strict=True):
        if t > 0:  # keep |tau| >= t
            and_mask(tau, ge_mask(abs_bits(tau), _bits(t)))
        taus.append(tau)
    return _anchor(x, general_weight) + _consensus_sum(taus, w, True, normalize, "ptm")


class _Lazy:
    """A value computed on first use (the flat indices: only blocks with entries at a threshold need them)."""

    def __init__(self, make: Callable[[], np.ndarray]):
        self.make, self.v = make, None

    def __call__(self) -> np.ndarray:
        if self.v is None:
            self.v = self.make()
        return self.v


def _bits(v: float) -> int:
    """The uint32 bit pattern of float32(v) for v >= 0 (math.inf: above every finite pattern)."""
    return int(np.array([v], np.float32).view(np.uint32)[0])


def _trim_exact(t: np.ndarray, thr: float, cut: int, at: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """t (in place) with mergekit's exact-k trim: keep |t| > thr, and |t| == thr where the flat index <= cut
    (`at(positions)`: the flat indices of positions of t)."""
    if thr < 0:
        return t
    if math.isinf(thr):
        return np.zeros_like(t)
    tb = _bits(thr)
    ab = abs_bits(t)
    eq = np.flatnonzero(ab == np.uint32(tb)) if cut >= 0 else np.zeros(0, np.intp)
    if eq.size:
        eq = eq[at(eq) <= np.uint64(cut)]
        vals = t.reshape(-1)[eq]
    and_mask(t, ge_mask(ab, tb, strict=True))
    if eq.size:
        t.reshape(-1)[eq] = vals
    return t


def ties_stats(
    tau_blocks: Callable[[int], Iterable[np.ndarray]],
    n_skills: int,
    numel: int,
    density: Any = 1.0,
    convention: str = "ptm",
    **_: Any,
) -> dict[str, Any]:
    """Per skill, the magnitude of the ceil(density * numel)-th largest task-vector entry (kept: |tau| >= it)."""
    if convention == "mergekit" or all(_per(density, k) >= 1.0 for k in range(n_skills)):
        return {"thresholds": [0.0] * n_skills}
    out = []
    for i in range(n_skills):
        d = _per(density, i)
        out.append(0.0 if d >= 1.0 else kth_largest_abs(tau_blocks(i), max(1, math.ceil(d * numel)), numel))
    return {"thresholds": out}


def _select_taus(stream, numel: int, wants: Callable[[int], list[int]], where: bool = False
                 ) -> tuple[dict[int, AbsSelect], list[Callable[[], np.ndarray]], int]:
    """One pass over a unit: per skill k an AbsSelect of the ranks `wants(k)` of |tau_k| (skills with no wanted
    rank are skipped), the pieces' flat-index callables (for `exact_cutoff`) and the number of skills."""
    sels: dict[int, AbsSelect] = {}
    flats: list[Callable[[], np.ndarray]] = []
    n_skills = 0
    for x, idx in stream():
        if not flats:
            n_skills = len(x["skills"])
            for k in range(n_skills):
                ks = wants(k)
                if ks:
                    sels[k] = AbsSelect(numel, ks, where)
        piece = len(flats)
        flats.append(idx)
        pre = np.ascontiguousarray(x["pre"]).reshape(-1)
        skills = [np.ascontiguousarray(s).reshape(-1) for s in x["skills"]]
        if piece == 0:
            step = max(1, pre.size // SAMPLE)
            for k, sel in sels.items():
                sel.prime(abs_bits(skills[k][::step] - pre[::step]))
        tau = np.empty(min(SUB, pre.size), np.float32)
        for sl in sub_blocks(pre.size):
            t = tau[: sl.stop - sl.start]
            for k, sel in sels.items():
                np.subtract(skills[k][sl], pre[sl], out=t)
                sel.feed(abs_bits(t, out=t.view(np.uint32)), piece, sl.start)
    return sels, flats, n_skills


def ties_unit_stats(stream, numel: int, density: Any = 1.0, convention: str = "ptm", **_: Any) -> dict[str, Any]:
    """convention "mergekit": per skill (threshold, cutoff) keeping exactly k = int(density * numel) entries of the
    unit: every |tau| > threshold, and the entries equal to it with flat index <= cutoff (-1: none of them).
    One pass for all skills (`AbsSelect`); a skill whose bracket misses takes the radix selection and a tie pass."""
    if convention != "mergekit":
        return {}

    def want(k: int) -> list[int]:
        n_keep = int(_per(density, k) * numel)
        return [n_keep] if 0 < n_keep < numel else []

    sels, flats, n_skills = _select_taus(stream, numel, want, where=True)
    out = []
    for k in range(n_skills):
        n_keep = int(_per(density, k) * numel)
        if n_keep >= numel:
            out.append((-1.0, -1))  # keep all (|tau| > -1)
            continue
        if n_keep == 0:
            out.append((math.inf, -1))
            continue
        v = sels[k].value(0)
        if v is None:
            out.append(_exact_radix(stream, k, n_keep))
            continue
        above, ties_at = sels[k].ties(0, v)
        out.append((as_float(v),
                    exact_cutoff(above, n_keep, ties_at, lambda b: flats[b]())))
    return {"exact": out}


def _exact_radix(stream, k: int, n_keep: int) -> tuple[float, int]:
    """The exact-k (threshold, cutoff) of skill k by the radix selection and one more pass for the ties."""
    thr = kth_largest_abs(_stream_taus(stream, k), n_keep)
    n_gt, ties_idx = 0, []
    for x, idx in stream():
        a = np.abs(x["skills"][k] - x["pre"])
        n_gt += int((a > np.float32(thr)).sum())
        ties_idx.append(idx().reshape(a.shape)[a == np.float32(thr)].ravel())
    need = n_keep - n_gt
    allt = np.sort(np.concatenate(ties_idx)) if ties_idx else np.zeros(0, np.uint64)
    return thr, (int(allt[need - 1]) if need > 0 else -1)


def dare(x: Arrays, w: list[float], ctx: Context, drop_rate: Any = 0.1, convention: str = "ptm",
         general_weight: float = 1.0) -> np.ndarray:
    """DARE (linear): drop each task-vector entry with probability p, rescale the rest by 1/(1-p) (convention
    "mergekit": by the unit's |tau|_1 / |tau kept|_1), then anchor + sum_k omega_k tau_k'. The mask of skill k at
    element i is a function of (seed, tensor name, k, i)."""
    out = np.array(_anchor(x, general_weight), dtype=np.float32, copy=True)
    for t, wk in zip(_dare_taus(x, ctx, drop_rate, convention), w, strict=True):
        out += np.multiply(t, _f32(wk), out=t)
    return out


def breadcrumbs_stats(stream, numel: int, density: Any = 0.9, gamma: Any = 0.01, **_: Any) -> dict[str, Any]:
    """Per skill: drop the top `gamma` fraction of |tau| and the bottom 1 - density - gamma (so `density` remains;
    when gamma >= 1 - density only the top 1 - density is dropped). Keep lo <= |tau| < hi. One pass for all
    skills and both bounds (`AbsSelect`), the radix selection where a bracket misses."""
    def ranks(k: int) -> tuple[int, int, int]:
        d, gm = _per(density, k), _per(gamma, k)
        n_top = int(min(gm, 1.0 - d) * numel)
        return n_top, int(d * numel), n_top + int(d * numel)

    def want(k: int) -> list[int]:
        n_top, _, n_lo = ranks(k)
        return [n_top if n_top > 0 else 1, n_lo if 0 < n_lo < numel else 1]

    sels, _, n_skills = _select_taus(stream, numel, want)
    out = []
    for k in range(n_skills):
        n_top, n_keep, n_lo = ranks(k)

        def at(j: int, rank: int, k=k) -> float:
            v = sels[k].value(j)
            return as_float(v) if v is not None else kth_largest_abs(
                _stream_taus(stream, k), rank)

        hi = at(0, n_top) if n_top > 0 else math.inf
        lo = at(1, n_lo) if 0 < n_lo < numel else 0.0
        if n_keep == 0:
            lo = math.inf
        out.append((lo, hi))
    return {"bounds": out}


def _breadcrumbs(consensus: bool):
    def fn(x: Arrays, w: list[float], ctx: Context, density: Any = 0.9, gamma: Any = 0.01, lambda_: float = 1.0,
           normalize: bool = False) -> np.ndarray:
        taus = []
        for t, (lo, hi) in zip(_taus(x), ctx.unit["bounds"], strict=True):
            a = np.abs(t)
            taus.append(np.where((a >= np.float32(lo)) & (a < np.float32(hi)), t, np.float32(0)))
        mixed = _consensus_sum(taus, w, consensus, normalize, "mergekit" if consensus else "ptm")
        return x["pre"] + _f32(lambda_) * mixed

    fn.__doc__ = "Model Breadcrumbs: drop the largest `gamma` and smallest |tau| (keep `density`), " + (
        "TIES sign election, " if consensus else "") + "then pre + lambda * sum_k w_k tau_k'."
    return fn


def dare_stats(stream, numel: int, drop_rate: Any = 0.1, convention: str = "ptm", seed: int = 0, name: str = "",
               **_: Any) -> dict[str, Any]:
    """convention "mergekit": per skill, the factor |tau|_1 / |tau kept|_1 that keeps the unit's L1 norm. The keep
    masks computed for it are kept too, packed 1 bit per entry (`keep_bits`, from flat index `unit_start`), so
    that the combine reuses them instead of drawing them again; None when the pieces are not contiguous runs."""
    if convention != "mergekit":
        return {}
    tot: dict[int, list[float]] = {}
    packed: dict[int, np.ndarray] | None = {}
    unit_start = None
    for x, idx in stream():
        start = getattr(idx, "start", None)
        fi = idx().reshape(-1) if start is None else None
        if unit_start is None:
            unit_start = start
        pre = np.ascontiguousarray(x["pre"]).reshape(-1)
        skills = [np.ascontiguousarray(s).reshape(-1) for s in x["skills"]]
        off = start - unit_start if start is not None and unit_start is not None else None
        if off is None or off % 8 or (pre.size % 8 and off + pre.size < numel):
            packed = None  # bits of this piece would not start on a byte of the unit's bit array
        buf = np.empty(min(SUB, pre.size), np.float32)
        for sl in sub_blocks(pre.size):
            a = buf[: sl.stop - sl.start]
            where = Run(start + sl.start, sl.stop - sl.start) if fi is None else fi[sl]
            for k, s in enumerate(skills):
                np.subtract(s[sl], pre[sl], out=a)
                np.abs(a, out=a)
                t = tot.setdefault(k, [0.0, 0.0])
                t[0] += float(np.add.reduce(a, dtype=np.float32))
                m = keep_mask(seed, name, k, where, _per(drop_rate, k))
                t[1] += float(np.add.reduce(and_mask(a, m), dtype=np.float32))
                if packed is not None:
                    bits = packed.setdefault(k, np.zeros((numel + 7) // 8, np.uint8))
                    o = off + sl.start
                    bits[o // 8: (o + a.size + 7) // 8] = np.packbits(m != 0)  # contiguous bool: fast
    return {"l1_scale": [a / b if b > 0 else 1.0 for a, b in (tot[k] for k in sorted(tot))],
            "keep_bits": [packed[k] for k in sorted(packed)] if packed else None, "unit_start": unit_start}


def _dare_mask(ctx: Context, k: int, idx: Callable[[], np.ndarray], n: int, p: float) -> np.ndarray:
    """The keep mask (uint32) of skill k on this slice: unpacked from the unit's `keep_bits` when the slice is a
    contiguous run inside the unit, else drawn (the same bits either way)."""
    run = flat_run(ctx.flat_index, 0, n)
    bits = ctx.unit.get("keep_bits")
    if run is not None and bits is not None:
        off = run.start - ctx.unit["unit_start"]
        if 0 <= off and off + n <= bits[k].size * 8:
            u = np.unpackbits(bits[k][off // 8: (off + n + 7) // 8])[off % 8: off % 8 + n]
            return np.negative(u, dtype=np.uint32)
    return keep_mask(ctx.seed, ctx.name, k, run if run is not None else idx().reshape(-1), p)


def _dare_taus(x: Arrays, ctx: Context, drop_rate: Any, convention: str) -> list[np.ndarray]:
    """Each skill's tau_k with DARE's drop (entries set to +0) and rescale, as fresh arrays."""
    flat = _Lazy(lambda: _flat(ctx, x["pre"]))
    out = []
    for k, t in enumerate(_taus(x)):
        p = _per(drop_rate, k)
        scale = _f32(ctx.unit["l1_scale"][k]) if convention == "mergekit" else np.float32(1.0) / np.float32(1.0 - p)
        np.multiply(t, scale, out=t)
        out.append(and_mask(t, _dare_mask(ctx, k, flat, t.size, p)))
    return out


def dare_ties(x: Arrays, w: list[float], ctx: Context, drop_rate: Any = 0.1, normalize: bool = True,
              lambda_: float = 1.0, convention: str = "ptm") -> np.ndarray:
    """DARE's random drop + rescale, then TIES' sign election and disjoint mean: pre + lambda * mixed."""
    taus = _dare_taus(x, ctx, drop_rate, convention)
    return x["pre"] + _f32(lambda_) * _consensus_sum(taus, w, True, normalize, convention)


DELLA_BLOCK = 1 << 20  # entries per row block of DELLA's per-row ranking
DELLA_THREADS = merge_threads()  # threads over the row blocks of a unit


def _della_probs(a: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probabilities from density - epsilon (smallest |tau| of a row) to density + epsilon (largest), linear
    in the rank within the row (last axis)."""
    c = a.shape[-1]
    if c <= 1:
        return np.full(a.shape, density, np.float32)
    # rank = the inverse of the stable sort's permutation, scattered (was a second argsort). The stable order
    # comes from sorting unique uint64 keys (|a|'s bit pattern, which orders like the value, above the column):
    # np.sort's SIMD sort plus the key build is 2.3x faster than a stable argsort, and gives the same order.
    # Then the same float32 operations in the same order as (d - e) + 2e * rank / (c - 1).
    key = np.abs(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.arange(c, dtype=np.uint64)
    key.sort(axis=-1)
    key &= np.uint64(0xFFFFFFFF)
    p = np.empty(a.shape, np.float32)
    order = key.view(np.int64)  # the columns, < 2^32: the same bits as int64, no copy
    np.put_along_axis(p, order, np.broadcast_to(np.arange(c, dtype=np.float32), a.shape), axis=-1)
    p *= np.float32(2 * epsilon)
    p /= np.float32(c - 1)
    p += np.float32(density - epsilon)
    return p


def _della(consensus: bool):
    def fn(x: Arrays, w: list[float], ctx: Context, density: Any = 0.7, epsilon: Any = 0.1, lambda_: float = 1.0,
           normalize: bool = True, rescale: bool = True) -> np.ndarray:
        shape = x["pre"].shape
        m2 = as_matrix(shape) if len(shape) >= 2 else (1, max(1, math.prod(shape)))
        n_skills = len(x["skills"])
        for k in range(n_skills):
            d, e = _per(density, k), _per(epsilon, k)
            if not (0 < d - e and d + e <= 1):
                raise MergeError(f"della: need 0 < density - epsilon and density + epsilon <= 1 (got {d}, {e})")
        whole = _Lazy(lambda: _flat(ctx, x["pre"]).reshape(m2))  # only when the unit is not one contiguous run
        pre2, skills2 = x["pre"].reshape(m2), [s.reshape(m2) for s in x["skills"]]
        out = np.empty(m2, np.float32)
        # Row blocks of ~1M entries: every step is row-local, and whole-unit temporaries (int64 sort indices,
        # uint64 flat indices) of a 32000 x 2048 embedding cost ~3.5 GB private memory. The blocks run on a few
        # threads (numpy's sorts and large ufuncs release the GIL); each writes its own rows, so the result does
        # not depend on the schedule.
        step = max(1, DELLA_BLOCK // m2[1])

        def block(r0: int) -> None:
            r1 = min(m2[0], r0 + step)
            pre = pre2[r0:r1].astype(np.float32)  # the unit comes in its stored dtype (stored_dtype_units)
            run = flat_run(ctx.flat_index, r0 * m2[1], r1 * m2[1])
            idx = whole()[r0:r1] if run is None else run
            taus = []
            for k, sk in enumerate(skills2):
                d, e = _per(density, k), _per(epsilon, k)
                t2 = sk[r0:r1].astype(np.float32) - pre
                p = _della_probs(np.abs(t2), d, e)
                keep = uniform_from_index(ctx.seed, ctx.name, k, idx).reshape(p.shape) < p
                taus.append(np.where(keep, t2 / p if rescale else t2, np.float32(0)).astype(np.float32))
            mixed = _consensus_sum(taus, w, consensus, normalize, "mergekit")
            out[r0:r1] = pre + _f32(lambda_) * mixed

        starts = range(0, m2[0], step)
        if len(starts) > 1 and DELLA_THREADS > 1:
            if flat_run(ctx.flat_index, 0, 1) is None:
                whole()  # the index array, built once before the threads share it
            with ThreadPoolExecutor(min(DELLA_THREADS, len(starts))) as pool:
                list(pool.map(block, starts))
        else:
            for r0 in starts:
                block(r0)
        return out.reshape(shape)

    fn.__doc__ = "DELLA (MAGPRUNE): keep each tau entry with a probability linear in its magnitude rank within its " \
        "row, rescale by 1/p, " + ("TIES sign election, " if consensus else "") + "pre + lambda * mixed."
    return fn


SCE_CACHE = 1 << 26  # entries: a unit up to this size keeps its float32 variances between Select's passes


def _sce_var(taus: list[np.ndarray]) -> np.ndarray:
    """Per position, the variance of the task vectors across models (float64 sums, float32 result: equal
    variances in exact arithmetic stay equal, so threshold ties are real ties). The operations of
    `np.var(np.stack(taus).astype(np.float64), axis=0)` in its order (rows summed in turn, the mean, the squared
    deviations summed in turn, divided by k), bit for bit, on cache-sized sub-blocks: 5x faster than np.var's
    whole-piece float64 temporaries (measured)."""
    k, shape = len(taus), taus[0].shape
    flat = [np.ascontiguousarray(t).reshape(-1) for t in taus]
    n = flat[0].size
    out = np.empty(n, np.float32)
    mean, dev, acc = (np.empty(min(SUB, n)) for _ in range(3))
    for sl in sub_blocks(n):
        m = sl.stop - sl.start
        mn, dv, ac = mean[:m], dev[:m], acc[:m]
        mn[...] = flat[0][sl]
        for t in flat[1:]:
            np.add(mn, t[sl], out=mn)
        np.true_divide(mn, k, out=mn)
        for i, t in enumerate(flat):
            np.subtract(t[sl], mn, out=dv)
            np.multiply(dv, dv, out=dv)
            if i == 0:
                ac[...] = dv
            else:
                np.add(ac, dv, out=ac)
        np.true_divide(ac, k, out=ac)
        out[sl] = ac
    return out.reshape(shape)


def sce_stats(stream, numel: int, select_topk: float = 1.0, convention: str = "ptm", **_: Any) -> dict[str, Any]:
    """SCE's Select over the whole unit: keep the top k positions by variance across the task vectors, then per
    model sum tau^2 over the kept positions (normalised: the matrix-level weights). convention "ptm": k =
    int(select_topk * numel), every position with variance >= the k-th largest kept (ties included); "mergekit"
    (0.1.5, measured): k = int(select_topk * #positions with variance > 0), exactly k kept (ties at the threshold
    by lowest flat index; mergekit's torch.topk order among them cannot be reproduced), zero variance never kept.
    select_topk >= 1 keeps everything in both."""
    if select_topk < 0:
        raise MergeError(f"sce: select_topk must be >= 0 (got {select_topk})")

    # The unit's variances, computed once and kept for Select's passes when they fit (float32, <= 256 MB),
    # else recomputed per pass from the stream; (flat variances, flat index) per piece in stream order.
    kept = [(_sce_var(_taus(x)).reshape(-1), idx) for x, idx in stream()] if (
        select_topk < 1.0 and numel <= SCE_CACHE) else None

    def var_pieces() -> Iterable[tuple[np.ndarray, Any]]:
        return iter(kept) if kept is not None else ((_sce_var(_taus(x)).reshape(-1), idx) for x, idx in stream())

    def var_blocks() -> Iterable[np.ndarray]:
        return (v for v, _ in var_pieces())

    sel: tuple[float, int] | None = None  # (threshold, flat-index cutoff among ties; -1: keep every tie)
    if select_topk < 1.0:
        n = numel if convention != "mergekit" else sum(int(np.count_nonzero(v)) for v in var_blocks())
        k = int(select_topk * n)
        if k == 0:
            sel = (math.inf, -1)
        else:
            # the k-th largest of all numel variances is the k-th largest nonzero one (k <= n)
            thr = kth_largest_abs(var_blocks, k, numel if kept is not None else None)
            sel = (thr, -1)
            if convention == "mergekit":
                n_gt, ties_idx = 0, []
                for v, idx in var_pieces():
                    n_gt += int(np.count_nonzero(v > np.float32(thr)))
                    eq = np.flatnonzero(v == np.float32(thr))
                    start = getattr(idx, "start", None)
                    ties_idx.append(eq.astype(np.uint64) + np.uint64(start) if start is not None
                                    else idx().reshape(-1)[eq])
                t = np.sort(np.concatenate(ties_idx))
                sel = (thr, int(t[k - n_gt - 1]))
    ss = None
    cached = iter(kept) if kept is not None else None
    for x, idx in stream():
        taus = _taus(x)
        keep = _sce_keep(taus, sel, idx, next(cached)[0] if cached is not None else None)
        v = np.array([float(np.square(_masked(t, keep) if keep is not None else t, dtype=np.float64).sum())
                      for t in taus])
        ss = v if ss is None else ss + v
    tot = float(ss.sum())
    return {"select": sel, "weights": list(ss / tot) if tot > 0 else [1.0 / len(ss)] * len(ss)}


def _finite(t: np.ndarray) -> bool:
    return bool(np.isfinite(t).all())


def _masked(t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """np.where(keep, t, 0) (float32): as t * keep when t is finite (5x faster; -0 for dropped negative entries,
    which every later sum and sign test treats as 0)."""
    return np.multiply(t, keep, dtype=np.float32) if _finite(t) else np.where(keep, t, np.float32(0))


def _sce_keep(taus: list[np.ndarray], sel: tuple[float, int] | None, idx: Callable[[], np.ndarray],
              var: np.ndarray | None = None) -> np.ndarray | None:
    """The Select mask of a piece (None: everything kept); `var`: the piece's variances if known."""
    if sel is None:
        return None
    thr, cut = sel
    v = (_sce_var(taus) if var is None else var).reshape(taus[0].shape)
    if cut < 0:
        return v >= np.float32(thr)
    eq = v == np.float32(thr)
    start = getattr(idx, "start", None)
    if start is not None:  # a contiguous run: flat index <= cut is local position <= cut - start
        if cut < start:
            eq[...] = False
        elif cut - start < eq.size:
            eq.reshape(-1)[cut - start + 1:] = False
    else:
        eq &= idx().reshape(v.shape) <= np.uint64(cut)
    return (v > np.float32(thr)) | eq


def sce(x: Arrays, w: list[float], ctx: Context, select_topk: float = 1.0, lambda_: float = 1.0,
        convention: str = "ptm") -> np.ndarray:
    """SCE (FuseChat, arXiv 2408.07990): Select positions by task-vector variance, Calculate matrix-level weights
    from mean tau^2, Erase by sign election; pre + lambda * (sum of agreeing weighted taus / sum of their
    weights). `convention` only changes Select (sce_stats)."""
    taus = _taus(x)
    idx = ctx.flat_index if ctx.flat_index is not None else (lambda: _flat(ctx, taus[0]))  # a run: no index array
    keep = _sce_keep(taus, ctx.unit["select"], idx)
    if keep is not None:
        taus = [_masked(t, keep) for t in taus]
    return x["pre"] + _f32(lambda_) * _sce_erase(taus, ctx.unit["weights"])


def _sce_erase(taus: list[np.ndarray], w: list[float]) -> np.ndarray:
    """SCE's Erase: the sign of the *unweighted* sum of the selected task vectors is elected ("+" on a zero vote),
    entries of the other sign are erased, and the rest are averaged with weights w (sum w_k tau_k over agreeing
    k / sum of their w_k). The weights do not enter the vote: the TIES paper's sgn(sum tau), which SCE adopts
    (mergekit 0.1.5 measured: a weighted vote differs on 0.3 % of elements)."""
    total = np.zeros_like(taus[0])
    for t in taus:
        total += t
    mixed = np.zeros_like(total)
    divisor = np.zeros_like(total)
    if all(w_ >= 0 for w_ in w) and all(_finite(t) for t in taus):
        # The same sums without np.sign / np.where (~1 ns per entry each, measured): with s = -1 where the sum is
        # negative else +1, t agrees iff t * s > 0, and multiplying by the 0/1 mask adds wk * t or (+-)0 exactly
        # as np.where's 0 does (the sums start at +0 and wk >= 0, so no -0 survives).
        s = np.float32(1) - np.float32(2) * (total < 0)
        for t, wk in zip(taus, w, strict=True):
            agree = np.multiply(t, s) > 0
            mixed += np.multiply(_f32(wk) * t, agree)
            divisor += np.multiply(_f32(wk), agree, dtype=np.float32)
    else:
        sign = np.where(total < 0, np.float32(-1), np.float32(1))
        for t, wk in zip(taus, w, strict=True):
            agree = np.sign(t) == sign
            mixed += np.where(agree, _f32(wk) * t, np.float32(0))
            divisor += np.where(agree, _f32(wk), np.float32(0))
    divisor[np.abs(divisor) < 1e-8] = 1
    return np.divide(mixed, divisor, out=mixed)


for _name, _cons in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    register(Method(_name, _breadcrumbs(_cons), _GTA, (), "skills",
                    {"density": 0.9, "gamma": 0.01, "lambda_": 1.0, "normalize": False},
                    unit_stats=breadcrumbs_stats, doc="drop largest gamma and smallest |tau|" +
                    (", sign election" if _cons else "")))
register(Method("dare_ties", dare_ties, _GTA, (), "skills",
                {"drop_rate": 0.1, "normalize": False, "lambda_": 1.0, "convention": "ptm"},
                unit_stats=dare_stats, doc="DARE drop/rescale + TIES sign election"))
for _name, _cons in (("della", True), ("della_linear", False)):  # normalize defaults as in mergekit 0.1.5
    register(Method(_name, _della(_cons), _GTA, (), "skills",
                    {"density": 0.7, "epsilon": 0.1, "lambda_": 1.0, "normalize": _cons, "rescale": True},
                    kind="matrix", stored_dtype_units=True, doc="magnitude-ranked keep probabilities per row" +
                    (", sign election" if _cons else "")))
register(Method("sce", sce, _GTA, (), "none", {"select_topk": 1.0, "lambda_": 1.0, "convention": "ptm"},
                unit_stats=sce_stats,
                check_inputs=_count("skills", 1), doc="variance select, tau^2 weights, sign election"))
register(
    Method(
        "ties",
        ties,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"density": 1.0, "normalize": True, "convention": "ptm", "general_weight": 1.0},
        stats=ties_stats,
        unit_stats=ties_unit_stats,
        doc="trim, elect sign, disjoint mean",
    )
)
register(
    Method(
        "dare",
        dare,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"drop_rate": 0.1, "convention": "ptm", "general_weight": 1.0},
        unit_stats=dare_stats,
        doc="random drop p, rescale 1/(1-p), task arithmetic",
    )
)
