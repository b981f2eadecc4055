"""Issue 12: a merge output can never destroy data — on gs:// as on local disk, killed at any instant.

One placement rule (ptm.ckpt.placement) decides where an output may go and how it replaces what was there.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ptm.ckpt import placement
from ptm.ckpt.stores import gcs_fs, open_store
from ptm.cli import main
from ptm.errors import OutputError
from ptm.merge import engine
from ptm.merge.recipe import Recipe
from tests.merge.conftest import random_tree, save_orbax


def _ta(paths: dict[str, str], out: str, omega: float = 0.3, fmt: str | None = None) -> Recipe:
    return Recipe(method="task_arithmetic", inputs={"pre": paths["pre"], "general": paths["general"],
                                                      "skills": [paths["skill"]]},
                  weights=omega, out=out, output_format=fmt, output_dtype="float32")


def _inputs(root: str) -> dict[str, str]:
    """Three tiny ptm checkpoints under `root` (local dir or gs:// prefix)."""
    out = {}
    for i, role in enumerate(("pre", "general", "skill")):
        out[role] = save_orbax(f"{root}/{role}", random_tree(i))
    return out


def _cli_merge(paths, out, *extra) -> list[str]:
    return ["merge", "--method", "task_arithmetic", "--pre", paths["pre"], "--general", paths["general"],
            "--skill", paths["skill"], "--out", out, "--no-progress", *extra]


def _objects(prefix: str) -> list[str]:
    fs = gcs_fs()
    fs.invalidate_cache()
    try:
        return sorted(fs.find(prefix[5:]))
    except FileNotFoundError:
        return []


def _tensor(path: str, name: str = "embed.embedding") -> np.ndarray:
    st = open_store(path)
    return np.asarray(st.read(name, (slice(None),) * len(st.tensors()[name].shape)), np.float32)


def _expected(omega: float, name: str = "embed.embedding") -> np.ndarray:
    from ptm.ckpt.tree import flatten

    pre, gen, sk = (flatten(random_tree(i))[name].astype(np.float32) for i in range(3))
    return gen + np.float32(omega) * (sk - pre)


# ------------------------------------------------------------------------------------------ refusing outputs


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_gcs_output_over_foreign_objects_is_refused(gcs_bucket, fmt, capsys):
    paths = _inputs(f"{gcs_bucket}/in")
    with gcs_fs().open(f"{gcs_bucket}/important/notes.txt", "w") as f:
        f.write("my notes")
    rc = main(_cli_merge(paths, f"{gcs_bucket}/important", "--omega", "0.3", "--output-format", fmt))
    assert rc == 2 and "output exists" in capsys.readouterr().err
    assert _objects(f"{gcs_bucket}/important") == [f"{gcs_bucket[5:]}/important/notes.txt"]


def test_gcs_output_containing_the_inputs_is_refused(gcs_bucket, capsys):
    paths = _inputs(f"{gcs_bucket}/runs")
    before = _objects(f"{gcs_bucket}/runs")
    for extra in ([], ["--overwrite"]):
        rc = main(_cli_merge(paths, f"{gcs_bucket}/runs", "--omega", "0.3", *extra))
        assert rc == 2 and "contains input" in capsys.readouterr().err
    assert _objects(f"{gcs_bucket}/runs") == before


def test_local_output_may_not_overlap_inputs_or_runs(tmp_path, capsys):
    paths = _inputs(str(tmp_path / "in"))
    # a training run: checkpoints/ + run.json
    run = tmp_path / "run"
    save_orbax(run / "checkpoints" / "100", random_tree(5))
    (run / "run.json").write_text("{}")
    link = tmp_path / "link_to_general"
    os.symlink(paths["general"], link)
    cases = {
        "inside an input": (dict(paths), f"{paths['general']}/merged", ["--overwrite"]),
        "an input (through a symlink)": ({**paths, "general": str(link)}, paths["general"], ["--overwrite"]),
        "a step of a run": (dict(paths), str(run / "checkpoints" / "101"), []),
        "the newest step of an input's run": ({**paths, "skill": str(run)}, str(run / "checkpoints" / "100"),
                                              ["--overwrite"]),
    }
    snapshot = {p: sorted(os.listdir(p)) for p in [*paths.values(), str(run / "checkpoints")]}
    for what, (ins, out, extra) in cases.items():
        rc = main(_cli_merge(ins, out, "--omega", "0.3", *extra))
        err = capsys.readouterr().err
        assert rc == 2 and ("lies inside" in err or " is " in err or "contains" in err), (what, err)
    assert {p: sorted(os.listdir(p)) for p in snapshot} == snapshot


# ------------------------------------------------------------------------------------------ replacing outputs


def test_interrupted_local_swap_is_restored(tmp_path, capsys):
    paths = _inputs(str(tmp_path / "in"))
    out = str(tmp_path / "m")
    engine.merge(_ta(paths, out, 0.3), progress=False, summary=False)
    os.rename(out, out + placement.OLD_SUFFIX)  # what a kill between the two renames of a swap leaves
    from ptm.ckpt import format as ckpt_format
    from ptm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"ptm-merge-old holds the previous output"):
        ckpt_format.resolve(out)
    with pytest.raises(OutputError, match="output exists"):  # restored first, so it exists again
        engine.merge(_ta(paths, out, 0.5), progress=False, summary=False)
    assert "restored" in capsys.readouterr().err
    np.testing.assert_array_equal(_tensor(out), _expected(0.3))
    assert not os.path.exists(out + placement.OLD_SUFFIX)


def test_gcs_overwrite_keeps_the_old_output_until_the_new_one_is_complete(gcs_bucket, monkeypatch):
    """Fail the commit at each of its steps: the output is always recoverable (old or new), never lost."""
    paths = _inputs(f"{gcs_bucket}/in")
    out = f"{gcs_bucket}/m3"
    engine.merge(_ta(paths, out, 0.3), progress=False, summary=False)
    real_copy = placement._copy_object

    class Boom(Exception):
        pass

    for fail_after in (0, 1, 3):  # copies done before the "kill"
        calls = {"n": 0}

        def copy(*a, calls=calls, fail_after=fail_after):
            if calls["n"] >= fail_after:
                raise Boom
            calls["n"] += 1
            return real_copy(*a)

        monkeypatch.setattr(placement, "_copy_object", copy)
        with pytest.raises(Boom):
            engine.merge(_ta(paths, out, 0.5), overwrite=True, progress=False, summary=False)
        monkeypatch.setattr(placement, "_copy_object", real_copy)
        placement.recover(out)  # what the next merge to `out` does first
        np.testing.assert_array_equal(_tensor(out), _expected(0.5))  # the staged new output was complete
        engine.merge(_ta(paths, out, 0.3), overwrite=True, progress=False, summary=False)
        np.testing.assert_array_equal(_tensor(out), _expected(0.3))
    assert not _objects(placement.staging_path(out))


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_merge_to_gcs_never_loses_the_output(gcs_bucket, overwrite):
    """Kill `ptm merge` to gs:// at random instants: afterwards (and after the recovery the next write does)
    the output is absent or a complete merge — the old one or the new one — never partial or gone."""
    paths = _inputs(f"{gcs_bucket}/in")
    out = f"{gcs_bucket}/m"
    if overwrite:
        engine.merge(_ta(paths, out, 0.3), progress=False, summary=False)
    rng = random.Random()
    args = [sys.executable, "-m", "ptm.cli", *_cli_merge(paths, out, "--omega", "0.5", "--overwrite",
                                                           "--output-dtype", "float32")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for _ in range(3):
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 6.0))  # start-up (jax import) takes ~2 s, the merge itself ~1-2 s
        p.send_signal(signal.SIGKILL)
        p.wait()
        placement.recover(out)
        if _objects(out):
            got = _tensor(out)
            ok = [w for w in ((0.3, 0.5) if overwrite else (0.5,)) if np.array_equal(got, _expected(w))]
            assert ok, "the output is neither the old nor the new merge"
        else:
            assert not overwrite, "the old output was lost"
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(_tensor(out), _expected(0.5))
    assert not _objects(placement.staging_path(out))
