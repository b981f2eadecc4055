"""The sparse methods' fast paths against their plain references: the in-place consensus sum, the one-pass
bracketed k-th largest, the exact-k TIES statistics, the 32-bit counter RNG and its integer keep masks, and the
engine's contiguous flat indices. Bit-identical where the fast path claims to be."""

from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np
import pytest

from ptm.merge import engine
from ptm.merge.methods import base, select, sparse


def _bf16ish(rng, shape, scale=0.02) -> np.ndarray:
    """float32 values on the bf16 grid (as task vectors of bf16 models are): many exact ties."""
    return (rng.standard_normal(shape) * scale).astype(ml_dtypes.bfloat16).astype(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("convention", ["ptm", "mergekit"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("w", [[1.0], [1.0, 0.3], [0.5, 2.0, 0.25], [-1.0, 0.5]])
def test_consensus_sum_equals_reference(convention, normalize, w):
    rng = np.random.default_rng(len(w))
    n = 5000
    taus = []
    for _ in w:
        t = _bf16ish(rng, n)
        t[rng.random(n) < 0.3] = 0.0  # trimmed entries
        t[rng.random(n) < 0.02] = -0.0
        taus.append(t)
    taus[0][:50] = -taus[-1][:50]  # exact cancellation: zero votes
    keep = [t.copy() for t in taus]
    got = base._consensus_sum(taus, w, True, normalize, convention)
    ref = base._consensus_ref(keep, w, True, normalize, convention)
    assert _same_bits(got, ref)
    assert all(_same_bits(a, b) for a, b in zip(taus, keep, strict=True))  # inputs untouched


def test_consensus_falls_back_when_a_weight_subset_sums_to_zero():
    assert not base._fast_divisors([1.0, -1.0], True) and base._fast_divisors([1.0, -1.0], False)
    rng = np.random.default_rng(1)
    taus = [_bf16ish(rng, 100) for _ in range(2)]
    got = base._consensus_sum([t.copy() for t in taus], [1.0, -1.0], True, True)
    assert _same_bits(got, base._consensus_ref(taus, [1.0, -1.0], True, True))


def _blocks(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, x.size, size)]


@pytest.mark.parametrize("k_frac", [1e-6, 0.01, 0.3, 0.5, 0.9, 1.0])
def test_kth_largest_one_pass_is_exact(k_frac):
    rng = np.random.default_rng(4)
    x = _bf16ish(rng, 300_001)
    want = np.sort(np.abs(x))[::-1]
    k = max(1, int(k_frac * x.size))
    blocks = _blocks(x, 70_000)
    assert base.kth_largest_abs(lambda: iter(blocks), k, x.size) == want[k - 1]
    sel = select.AbsSelect(x.size, [k])
    for b in blocks:
        sel.feed(select.abs_bits(b))
    assert sel.value(0) is not None  # the bracket held it: no second pass


def test_kth_largest_bracket_miss_falls_back_exactly():
    """A first block unlike the rest (small values first, large ones after) misses the bracket: still exact."""
    rng = np.random.default_rng(5)
    x = np.concatenate([_bf16ish(rng, 50_000, 1e-4), _bf16ish(rng, 200_000, 1.0)])
    blocks = _blocks(x, 50_000)
    k = 60_000
    sel = select.AbsSelect(x.size, [k])
    for b in blocks:
        sel.feed(select.abs_bits(b))
    assert sel.value(0) is None
    assert base.kth_largest_abs(lambda: iter(blocks), k, x.size) == np.sort(np.abs(x))[::-1][k - 1]
    # many equal values (zeros of an untouched tensor): the bracket gives up, the radix selection answers
    z = np.zeros(3_000_000, np.float32)
    z[:10] = 1.0
    assert base.kth_largest_abs(lambda: iter(_blocks(z, 1_000_000)), 20, z.size) == 0.0


def _stream(pre: np.ndarray, skills: list[np.ndarray], rows: int):
    """A unit stream like the engine's: row pieces of 2-D arrays with their global flat indices."""
    def gen():
        for r in range(0, pre.shape[0], rows):
            sl = slice(r, min(r + rows, pre.shape[0]))
            idx = engine._flat_index((sl, slice(0, pre.shape[1])), pre.shape)
            yield {"pre": pre[sl], "skills": [s[sl] for s in skills]}, (lambda idx=idx: idx)
    return gen


@pytest.mark.parametrize("density", [0.5, [0.2, 0.9], 0.999])
def test_ties_exact_stats_equal_radix_reference(density):
    rng = np.random.default_rng(6)
    pre = _bf16ish(rng, (300, 257))
    skills = [pre + _bf16ish(rng, pre.shape, 0.01) for _ in range(2)]
    stream = _stream(pre, skills, 64)
    got = sparse.ties_unit_stats(stream, pre.size, density=density, convention="mergekit")["exact"]
    for k in range(2):
        want = sparse._exact_radix(stream, k, int(sparse._per(density, k) * pre.size))
        assert got[k] == want
        # and the trim keeps exactly int(density n) entries of the unit
        thr, cut = got[k]
        tau = (skills[k] - pre).reshape(-1)
        t = sparse._trim_exact(tau.copy(), thr, cut, lambda pos: pos.astype(np.uint64))
        assert thr > 0 and np.count_nonzero(t) == int(sparse._per(density, k) * pre.size)


def test_breadcrumbs_bounds_equal_radix():
    rng = np.random.default_rng(7)
    pre = _bf16ish(rng, (200, 300))
    skills = [pre + _bf16ish(rng, pre.shape, 0.01) for _ in range(2)]
    stream = _stream(pre, skills, 50)
    got = sparse.breadcrumbs_stats(stream, pre.size, density=[0.5, 0.8], gamma=0.05)["bounds"]
    for k, (lo, hi) in enumerate(got):
        taus = sparse._stream_taus(stream, k)
        n_top = int(0.05 * pre.size)
        n_lo = n_top + int([0.5, 0.8][k] * pre.size)
        assert hi == base._kth_radix(taus, n_top) and lo == base._kth_radix(taus, n_lo)


def _splitmix_like_reference(seed: int, name: str, k: int, idx: np.ndarray) -> np.ndarray:
    """random_bits written out per element in Python ints (the formula of the docstring)."""
    key = base._key(seed, name, k)
    out = []
    for i in idx.tolist():
        lo, hi = i & 0xFFFFFFFF, i >> 32

        def h(x):
            for s, m in ((16, 0x7FEB352D), (15, 0x846CA68B)):
                x ^= x >> s
                x = (x * m) & 0xFFFFFFFF
            return x ^ (x >> 16)

        k32 = (h(hi ^ (key >> 32)) + (key & 0xFFFFFFFF)) & 0xFFFFFFFF
        out.append(h((lo * 0x9E3779B9 + k32) & 0xFFFFFFFF))
    return np.array(out, np.uint32)


def test_random_bits_formula_shards_and_high_words():
    idx = np.concatenate([np.arange(0, 300), np.arange((1 << 32) - 100, (1 << 32) + 100),
                          np.array([(5 << 32) + 7])]).astype(np.uint64)
    got = base.random_bits(3, "w", 1, idx)
    assert np.array_equal(got, _splitmix_like_reference(3, "w", 1, idx))
    # any subset / order of indices gives the same bits per element (what makes shards agree)
    perm = np.random.default_rng(0).permutation(idx.size)
    assert np.array_equal(base.random_bits(3, "w", 1, idx[perm]), got[perm])
    assert np.array_equal(base.random_bits(3, "w", 1, idx[:300].reshape(20, 15)), got[:300].reshape(20, 15))
    assert not np.array_equal(base.random_bits(3, "w", 2, idx), got)  # keyed by input k
    assert not np.array_equal(base.random_bits(4, "w", 1, idx), got)  # by seed
    assert not np.array_equal(base.random_bits(3, "v", 1, idx), got)  # by tensor name


def test_uniforms_and_keep_masks():
    idx = np.arange(2_000_000, dtype=np.uint64)
    u = base.uniform_from_index(0, "t", 0, idx)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 1e-3
    # independent across inputs: the two masks of p = 0.5 overlap on ~1/4 of the entries
    a = base.uniform_from_index(0, "t", 0, idx) >= 0.5
    b = base.uniform_from_index(0, "t", 1, idx) >= 0.5
    assert abs((a & b).mean() - 0.25) < 2e-3
    # the integer keep mask is exactly uniform >= float32(p), also for p on / next to the 2^-24 grid
    for p in (0.1, 0.3, 0.5, 0.9, 0.25, 0.25 + 2**-25, 0.25 - 2**-24, 1 - 2**-24, 2**-30):
        m = base.keep_mask(0, "t", 0, idx[:100_000], p)
        assert np.array_equal(m == 0xFFFFFFFF, u[:100_000] >= np.float32(p)) and np.all((m == 0) | (m == 0xFFFFFFFF))


def test_masks_equal_where():
    rng = np.random.default_rng(8)
    x = _bf16ish(rng, 10_000)
    x[::7] = -0.0
    ab = select.abs_bits(x)
    for t in (0.0, 1e-3, 0.02, math.inf):
        bits = int(np.array([t], np.float32).view(np.uint32)[0])
        for strict in (False, True):
            keep = np.abs(x) > np.float32(t) if strict else np.abs(x) >= np.float32(t)
            got = base.and_mask(x.copy(), base.ge_mask(ab, bits, strict))
            assert _same_bits(got, np.where(keep, x, np.float32(0)))


@pytest.mark.parametrize("shape", [(6, 5, 4), (7, 3), (10,)])
def test_flat_index_fast_path(shape):
    full = np.arange(math.prod(shape), dtype=np.uint64).reshape(shape)
    for region in itertools.product(*[[slice(0, d), slice(1, d), slice(0, 1), slice(d - 1, d)] for d in shape]):
        got = engine._flat_index(region, shape)
        assert np.array_equal(got, full[region]), region
        want = full[region].reshape(-1)
        contiguous = bool(np.all(np.diff(want.astype(np.int64)) == 1))
        start = engine._run_start(region, shape)
        assert (start is not None) == contiguous and (start is None or start == int(want[0])), region


def test_dare_mergekit_reuses_the_stats_masks():
    """dare_stats packs the keep masks it draws; the combine's unpacked masks equal freshly drawn ones, and the
    result equals the formula on the whole unit."""
    from ptm.merge.methods import base as B

    rng = np.random.default_rng(9)
    pre = _bf16ish(rng, (96, 130))
    skills = [pre + _bf16ish(rng, pre.shape, 0.01) for _ in range(2)]
    n, p = pre.size, [0.3, 0.6]

    def stream():
        for r in range(0, 96, 40):  # 40 * 130 entries: pieces start on whole bytes of the bit array
            sl = slice(r, min(r + 40, 96))
            reg = (sl, slice(0, 130))
            yield ({"pre": pre[sl], "skills": [s[sl] for s in skills]},
                   B.FlatIndex(lambda reg=reg: engine._flat_index(reg, pre.shape), engine._run_start(reg, pre.shape)))

    st = sparse.dare_stats(stream, n, drop_rate=p, convention="mergekit", seed=5, name="t")
    assert st["keep_bits"] is not None and st["unit_start"] == 0
    flat = lambda: np.arange(n, dtype=np.uint64)  # noqa: E731
    x = {"pre": pre.reshape(-1), "skills": [s.reshape(-1) for s in skills]}
    ws = [1.0, 0.3]
    whole = None
    for lo, hi in ((0, n), (8, 1000), (13, 2021)):  # block parts, also off the byte grid
        part = {"pre": x["pre"][lo:hi], "skills": [s[lo:hi] for s in x["skills"]]}
        run = B.FlatIndex(lambda lo=lo, hi=hi: flat()[lo:hi], lo)
        cached = sparse.dare(part, ws, B.Context(name="t", seed=5, flat_index=run, unit=st), p, "mergekit")
        drawn = sparse.dare(part, ws, B.Context(name="t", seed=5, flat_index=lambda lo=lo, hi=hi: flat()[lo:hi],
                                                unit={**st, "keep_bits": None}), p, "mergekit")
        assert _same_bits(cached, drawn)
        whole = cached if (lo, hi) == (0, n) else whole
    ref = x["pre"].copy()
    for k, s in enumerate(x["skills"]):
        tau = s - x["pre"]
        keep = B.uniform_from_index(5, "t", k, flat()) >= np.float32(p[k])
        scale = np.abs(tau).sum(dtype=np.float64) / np.abs(np.where(keep, tau, 0)).sum(dtype=np.float64)
        assert abs(st["l1_scale"][k] / scale - 1) < 1e-6
        ref += np.float32(ws[k]) * np.where(keep, tau * np.float32(st["l1_scale"][k]), np.float32(0))
    np.testing.assert_array_equal(whole, ref)


@pytest.mark.parametrize("shape", [(7, 33), (64, 300), (3, 2, 50), (4, 1)])
def test_della_probs_equal_the_double_argsort_formula_bit_for_bit(shape):
    """DELLA's keep probabilities from one stable sort and a scatter equal (d - e) + 2e * rank / (c - 1) with the
    rank from a double stable argsort, ties in a row included."""
    from ptm.merge.methods.sparse import _della_probs

    rng = np.random.default_rng(len(shape))
    a = np.abs(rng.standard_normal(shape).astype(np.float32))
    if shape[-1] > 10:
        a[..., :5] = a[..., 5:10]  # equal magnitudes within a row
    c = shape[-1]
    for d, e in [(0.5, 0.1), (0.7, 0.29), (0.3, 0.05)]:
        got = _della_probs(a, d, e)
        if c <= 1:
            assert np.all(got == np.float32(d))
            continue
        ranks = np.argsort(np.argsort(a, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float32)
        ref = (np.float32(d - e) + np.float32(2 * e) * ranks / np.float32(c - 1)).astype(np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(40, 24), (6, 5, 8), (50,)])
def test_della_row_blocks_equal_one_block_bit_for_bit(monkeypatch, name, shape):
    """DELLA works through a unit in row blocks (memory): any block size, with an index array or a contiguous run,
    gives the bits of one whole-unit block."""
    rng = np.random.default_rng(3)
    pre = rng.standard_normal(shape).astype(np.float32)
    x = {"pre": pre, "skills": [pre + 0.1 * rng.standard_normal(shape).astype(np.float32) for _ in range(2)]}
    n = math.prod(shape)
    from ptm.merge.methods import get

    fn = get(name).fn

    def run(block, start=None):  # start: the unit is one contiguous run of flat indices (no index array)
        monkeypatch.setattr(sparse, "DELLA_BLOCK", block)
        fi = base.FlatIndex(lambda: np.arange(n, dtype=np.uint64), start)
        return fn(x, [1.0, 0.5], base.Context(name="t", seed=2, flat_index=fi), density=0.5, epsilon=0.2)

    whole = run(1 << 30)
    for block, start in itertools.product((1, 7, 48, 1 << 30), (None, 0)):
        np.testing.assert_array_equal(run(block, start).view(np.uint32), whole.view(np.uint32),
                                      err_msg=f"{block} {start}")
