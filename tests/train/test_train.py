"""Training: loss goes down, init_from, gs:// runs, bad inputs. (Exact resume: test_resume.py.)"""

import json

import jax
import numpy as np
import pytest

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.params import load_params
from ptm.errors import CheckpointError, ConfigError
from ptm.model.config import ModelConfig
from ptm.parallel.mesh import MeshConfig
from ptm.train.loop import train

from .conftest import OPT, TINY, data_config


def test_loss_decreases_and_run_records_its_data(tmp_path, reverse_data):
    res = train(
        str(tmp_path / "run"),
        data_config(reverse_data, num_epochs=4),
        model=TINY,
        optimizer=OPT,
        save_every=1000,
        log_every=1,
        progress=False,
    )
    events = list((tmp_path / "run" / "tensorboard").iterdir())
    assert events, "tensorboard event files are written"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["complete"] and run["steps"] == res.steps == run["data"]["total_steps"]
    assert run["data"]["train_examples"] == 64
    assert run["data"]["examples_seen"] == 4 * 64
    ref = ckpt_format.resolve(tmp_path / "run")
    assert ref.meta["step"] == res.steps and ref.meta["data"]["train_examples"] == 64
    assert ref.meta["tokenizer"] == "byte"
    # Loss at the end is well below the loss of the untrained model (~ln 259 = 5.56).
    assert res.final_loss < 3.0


def test_init_from_loads_params_only_and_fresh_optimizer(tmp_path, reverse_data):
    first = train(
        str(tmp_path / "a"),
        data_config(reverse_data, num_epochs=1),
        model=TINY,
        optimizer=OPT,
        progress=False,
    )
    pa, _ = load_params(tmp_path / "a")
    res = train(
        str(tmp_path / "b"),
        data_config(reverse_data, num_epochs=1),
        model=TINY,
        optimizer=OPT.__class__(learning_rate=0.0),
        init_from=str(tmp_path / "a"),
        progress=False,
    )
    pb, meta = load_params(tmp_path / "b")
    assert meta["provenance"]["init_from"] == str(tmp_path / "a")
    assert res.steps == first.steps
    # lr=0 keeps the initial params: they must be exactly the source run's params.
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_relative_run_dir_and_init_from(tmp_path, reverse_data, monkeypatch):
    """`--gin.train.run_dir=runs/x` from the shell: Orbax wants absolute paths; ptm resolves relative ones."""
    monkeypatch.chdir(tmp_path)
    a = train("runs/a", data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT, progress=False)
    b = train("runs/b", data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT, init_from="runs/a",
              progress=False)
    assert a.steps == b.steps and ckpt_format.resolve("runs/b").meta["step"] == b.steps
    assert (tmp_path / "runs" / "b" / "run.json").exists()


def test_loading_one_item_does_not_print_orbax_metadata_warning(tmp_path, reverse_data, caplog):
    import logging

    train(str(tmp_path / "a"), data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT, progress=False)
    with caplog.at_level(logging.WARNING):
        load_params(tmp_path / "a")
        logging.getLogger("absl").warning("another orbax warning")
    msgs = [r.getMessage() for r in caplog.records]
    assert "another orbax warning" in msgs
    assert not any("Metadata file does not exist" in m for m in msgs), msgs


def test_sharded_training_on_8_devices_matches_one_device(tmp_path, reverse_data):
    assert jax.device_count() == 8
    dc = data_config(reverse_data, num_epochs=1)
    # Different layouts (pure fsdp vs data x fsdp x tensor), same math up to reduction order.
    a, b = (
        train(str(tmp_path / name), dc, model=TINY, optimizer=OPT, progress=False, log_every=1, mesh=mesh,
              stop_after_steps=3)
        for name, mesh in (("a", MeshConfig(data=1, fsdp=8, tensor=1)), ("b", MeshConfig(data=2, fsdp=2, tensor=2)))
    )
    pa, _ = load_params(tmp_path / "a")
    pb, _ = load_params(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)
    assert abs(a.final_loss - b.final_loss) < 1e-4


def test_run_dir_on_gcs(gcs_bucket, reverse_data):
    run = f"{gcs_bucket}/runs/x"
    res = train(
        run,
        data_config(reverse_data, num_epochs=1),
        model=TINY,
        optimizer=OPT,
        progress=False,
        save_every=2,
        stop_after_steps=4,
    )
    assert res.steps == 4
    again = train(run, data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT, progress=False)
    assert again.resumed_from == 4
    params, meta = load_params(run)
    assert meta["step"] == again.steps


def test_resume_with_a_different_model_is_refused(tmp_path, reverse_data):
    train(
        str(tmp_path / "r"),
        data_config(reverse_data),
        model=TINY,
        optimizer=OPT,
        progress=False,
        stop_after_steps=2,
    )
    bigger = ModelConfig(**{**TINY.to_dict(), "mlp_dim": 96})
    with pytest.raises(CheckpointError, match="mlp_dim: checkpoint 64 vs config 96"):
        train(str(tmp_path / "r"), data_config(reverse_data), model=bigger, optimizer=OPT, progress=False)
    # Nothing was lost: the original checkpoint is still there and loads.
    assert ckpt_format.resolve(tmp_path / "r").meta["step"] == 2


def test_init_from_something_that_is_not_a_checkpoint(tmp_path, reverse_data):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a ptm checkpoint"):
        train(
            str(tmp_path / "r"),
            data_config(reverse_data),
            model=TINY,
            optimizer=OPT,
            progress=False,
            init_from=str(tmp_path / "junk"),
        )


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, reverse_data):
    small = ModelConfig(**{**TINY.to_dict(), "vocab_size": 100})
    with pytest.raises(ConfigError, match="vocab_size=100"):
        train(str(tmp_path / "r"), data_config(reverse_data), model=small, optimizer=OPT, progress=False)


def test_batch_not_divisible_by_data_parallel_size(tmp_path, reverse_data):
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        train(
            str(tmp_path / "r"),
            data_config(reverse_data, global_batch_size=4),
            model=TINY,
            optimizer=OPT,
            progress=False,
        )


def test_run_json_appears_whole_or_not_at_all(tmp_path, reverse_data, monkeypatch):
    """run.json marks a run complete: a crash while writing it must not leave a partial file behind."""
    import os

    def crash(*a, **k):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        train(str(tmp_path / "run"), data_config(reverse_data, num_epochs=1), model=TINY, optimizer=OPT,
              save_every=1000, progress=False)
    assert not (tmp_path / "run" / "run.json").exists()
