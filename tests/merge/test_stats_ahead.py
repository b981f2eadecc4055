"""Statistics computed ahead: while one tensor is combined, a second thread computes the next tensor's whole-tensor
and per-unit statistics (TIES thresholds, SLERP's Gram matrix) when every input serves it as mapped views. The
output is the same bits as computing them in line, errors there reach the caller, and the thread always stops."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ptm.ckpt import stores as S
from ptm.errors import CheckpointError, MergeError
from ptm.merge import engine
from ptm.merge.recipe import Recipe
from tests.merge.conftest import BF16, save_safetensors

NAMES = [f"model.layers.{k}.mlp.up_proj.weight" for k in range(3)] + ["model.embed_tokens.weight"]


def _inputs(tmp_path, n: int = 3, dtype=BF16) -> list[str]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        t = {name: rng.standard_normal((24, 16)).astype(np.float32).astype(dtype) for name in NAMES}
        out.append(save_safetensors(tmp_path / f"in{i}", t))
    return out


def _recipe(method: str, paths: list[str], out) -> Recipe:
    if method in ("slerp", "karcher"):
        return Recipe(method, {"models": paths[:2]}, weights=[0.3] if method == "slerp" else [0.5, 0.5], out=str(out),
                      output_format="safetensors")
    weights = None if method == "model_stock" else [0.6, 0.4]
    return Recipe(method, {"pre": paths[0], "skills": paths[1:]}, weights=weights, out=str(out),
                  output_format="safetensors", **({"seed": 3} if method == "dare_ties" else {}))


def _stats_threads(monkeypatch) -> list[tuple[str, str]]:
    """Record (thread name, tensor) of every statistics computation."""
    seen: list[tuple[str, str]] = []
    orig = engine._Combiner._stats_of  # noqa: SLF001

    def spy(self, name):
        seen.append((threading.current_thread().name, name))
        return orig(self, name)

    monkeypatch.setattr(engine._Combiner, "_stats_of", spy)  # noqa: SLF001
    return seen


def _no_stats_thread() -> bool:
    return not any(t.name.startswith("ptm-merge-stats") for t in threading.enumerate())


@pytest.mark.parametrize("method", ["slerp", "ties", "model_stock", "dare_ties", "karcher"])
def test_ahead_gives_the_same_bits_as_in_line(tmp_path, monkeypatch, method):
    paths = _inputs(tmp_path)
    seen = _stats_threads(monkeypatch)
    engine.merge(_recipe(method, paths, tmp_path / "ahead"), progress=False, summary=False)
    first, *rest = sorted(NAMES)  # tensors are merged in name order
    assert seen[0] == ("MainThread", first)
    assert sorted(n for _, n in seen[1:]) == rest and all(t.startswith("ptm-merge-stats") for t, _ in seen[1:])
    seen.clear()
    monkeypatch.setattr(S.SafetensorsStore, "reads_are_views", lambda self, name: False)
    engine.merge(_recipe(method, paths, tmp_path / "inline"), progress=False, summary=False)
    assert [t for t, _ in seen] == ["MainThread"] * len(NAMES)  # not views: nothing ahead
    a, b = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("ahead", "inline"))
    assert a == b
    assert _no_stats_thread()


def test_methods_without_statistics_start_no_thread(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    started = []
    monkeypatch.setattr(engine, "ThreadPoolExecutor", lambda *a, **k: started.append(1))
    engine.merge(Recipe("linear", {"models": paths}, weights=[0.5, 0.3, 0.2], out=str(tmp_path / "o"),
                        output_format="safetensors"), progress=False, summary=False)
    assert not started


def test_an_error_in_the_statistics_thread_reaches_the_caller(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    orig = engine._Combiner._stats_of  # noqa: SLF001
    bad = sorted(NAMES)[2]

    def failing(self, name):
        if name == bad:
            raise CheckpointError(f"in0: tensor {name!r} unreadable")
        return orig(self, name)

    monkeypatch.setattr(engine._Combiner, "_stats_of", failing)  # noqa: SLF001
    with pytest.raises(CheckpointError, match=f"tensor '{bad}' unreadable"):
        engine.merge(_recipe("ties", paths, tmp_path / "out"), progress=False, summary=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert _no_stats_thread()


def test_a_failing_merge_stops_a_running_statistics_computation(tmp_path, monkeypatch):
    """The first tensor holds an Inf; meanwhile the statistics thread is busy reading the next one. The merge
    fails at once with the NaN/Inf error and the thread ends at its next read."""
    paths = _inputs(tmp_path)
    names = sorted(NAMES)
    a = S.SafetensorsStore(paths[1])
    t = {n: np.array(a.read(n, ())) for n in names}
    t[names[0]][3, 4] = np.inf
    paths[1] = save_safetensors(tmp_path / "inf", t)
    orig = engine._Combiner._stats_of  # noqa: SLF001
    reading = threading.Event()

    def endless(self, name):
        if name == names[0]:
            return orig(self, name)
        reading.set()
        while True:  # a computation that only a stop can end
            self.read(0, name, ())
            time.sleep(0.01)

    monkeypatch.setattr(engine._Combiner, "_stats_of", endless)  # noqa: SLF001
    t0 = time.monotonic()
    with pytest.raises(MergeError, match=f"tensor '{names[0]}' contains NaN/Inf"):
        engine.merge(_recipe("ties", paths, tmp_path / "out"), progress=False, summary=False)
    assert reading.is_set() and time.monotonic() - t0 < 30
    assert _no_stats_thread()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_found_in_every_float_dtype(tmp_path, dtype, bad):
    paths = _inputs(tmp_path, 2, dtype)
    names = sorted(NAMES)
    a = S.SafetensorsStore(paths[1])
    t = {n: np.array(a.read(n, ())) for n in names}
    t[names[1]][23, 15] = bad  # the last element of a later tensor
    paths[1] = save_safetensors(tmp_path / "bad", t)
    r = Recipe("linear", {"models": paths}, weights=[0.5, 0.5], out=str(tmp_path / "o"), output_format="safetensors")
    with pytest.raises(MergeError, match=f"bad.*tensor '{names[1]}' contains NaN/Inf"):
        engine.merge(r, progress=False, summary=False)
    r.allow_nonfinite = True
    engine.merge(r, progress=False, summary=False)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_finite_check_on_bits_matches_isfinite():
    rng = np.random.default_rng(0)
    for dt in (BF16, np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)):
        bits = rng.integers(0, 1 << (8 * dt.itemsize), 4096, dtype=np.uint64).astype(f"u{dt.itemsize}")
        x = bits.view(dt)
        for k in range(0, x.size, 64):
            blk = x[k:k + 64]
            f32 = blk.astype(np.float32)
            assert engine._finite(blk, f32) == bool(np.isfinite(f32).all()), (dt, k)  # noqa: SLF001
    big = np.array([1e39, 1.0])  # finite in float64, Inf in the float32 the methods compute in
    assert not engine._finite(big, big.astype(np.float32))  # noqa: SLF001
    assert engine._finite(np.arange(4, dtype=np.int32), np.arange(4, dtype=np.float32))  # noqa: SLF001
