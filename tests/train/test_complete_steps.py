"""Issue 12, item 5: only complete training steps are ever resolved, on gs:// as on local disk.

On gs:// Orbax writes `checkpoints/N/` in place and marks it complete with `commit_success.txt`; a reader must not
take a step that is still being written (or whose writer was killed).
"""

from __future__ import annotations

import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.params import load_params
from ptm.ckpt.stores import gcs_fs, open_store
from ptm.cli import main
from ptm.errors import CheckpointError
from ptm.train.loop import train
from tests.train.conftest import OPT, TINY, data_config


def _half_written_copy(run: str, src_step: int, dst_step: int) -> None:
    """What a gs:// writer killed mid-save leaves: the step's objects, but no commit_success.txt."""
    fs = gcs_fs()
    src, dst = f"{run}/checkpoints/{src_step}", f"{run}/checkpoints/{dst_step}"
    for obj in fs.find(src[5:]):
        if not obj.endswith(ckpt_format.COMMIT_FILE):
            fs.copy(obj, dst[5:] + obj[len(src) - 5:])
    fs.invalidate_cache()


def test_gcs_uncommitted_step_is_never_resolved(gcs_bucket, reverse_data, tmp_path, capsys):
    run = f"{gcs_bucket}/runs/x"
    train(run, data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT, progress=False, save_every=2,
          stop_after_steps=4, keep_checkpoints=5)
    steps = sorted(int(p.name) for p in epath.Path(f"{run}/checkpoints").iterdir())
    assert steps[-1] == 4
    assert any("tfevents" in o for o in gcs_fs().find(f"{run}/tensorboard"[5:]))  # events uploaded at close
    _half_written_copy(run, 4, 8)
    # Orbax itself agrees on which steps are finalized.
    assert ocp.path.step.is_path_finalized(epath.Path(f"{run}/checkpoints/4"))
    assert not ocp.path.step.is_path_finalized(epath.Path(f"{run}/checkpoints/8"))
    assert ckpt_format.resolve(run).root.name == "4"
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt_format.resolve(f"{run}/checkpoints/8")
    # every reader of the run dir takes step 4: inspect, merge, load (eval / init_from), resume
    assert main(["inspect", run]) == 0 and "checkpoints/4" not in capsys.readouterr().err
    assert open_store(run).meta["step"] == 4
    assert load_params(run)[1]["step"] == 4
    out = str(tmp_path / "m")
    assert main(["merge", "--method", "linear", "--model", run, "--model", run, "--omega", "0.5,0.5", "--out", out,
                 "--no-progress"]) == 0
    again = train(run, data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT, progress=False,
                  save_every=2, stop_after_steps=2, keep_checkpoints=5)
    assert again.resumed_from == 4


def test_a_reader_polling_a_training_gcs_run_sees_only_complete_steps(gcs_bucket, reverse_data):
    """A long-lived process resolves a gs:// run dir while another process trains into it: every resolved step
    loads, and the reader sees the new steps as they land (gcsfs's listing cache is invalidated)."""
    run = f"{gcs_bucket}/runs/live"
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from ptm.train.loop import train; from tests.train.conftest import OPT, TINY, data_config;"
        f"train({run!r}, data_config({reverse_data!r}, num_epochs=3), model=TINY, optimizer=OPT, progress=False,"
        " save_every=1, keep_checkpoints=3, async_checkpointing=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen: list[int] = []
    deadline = time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            try:
                ref = ckpt_format.resolve(run)
            except CheckpointError as e:
                assert "no complete checkpoint" in str(e) or "no such checkpoint" in str(e), e
                time.sleep(0.05)
                continue
            step = int(ref.root.name)
            try:
                st = open_store(run)
                assert st.meta["step"] >= step
                # the tensors of the resolved step are all readable
                for name, info in st.tensors().items():
                    st.read(name, (slice(None),) * len(info.shape))
            except CheckpointError as e:
                if "no such checkpoint" in str(e) or "missing or corrupt" in str(e):
                    continue  # deleted by keep-last-K between resolve and read: a complete step, removed
                raise
            if not seen or seen[-1] != step:
                seen.append(step)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert len(seen) >= 3 and seen == sorted(seen), seen
