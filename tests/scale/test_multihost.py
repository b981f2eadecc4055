"""Two real JAX processes on CPU (gloo collectives) agree with one process and with numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptm.errors import ConfigError
from ptm.parallel import distributed

from ..train.conftest import write_reverse_task
from .cluster import run_cluster
from .mp_worker import _global_inputs


def test_sharded_compute_two_processes_matches_numpy(tmp_path):
    x, w = _global_inputs()
    want = np.tanh(x @ w)
    results = run_cluster("compute", tmp_path)
    for r in results:
        np.testing.assert_allclose(r["y"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["total"], np.sum(want * want), rtol=1e-5)
    infos = [json.loads((tmp_path / f"info_{i}.json").read_text()) for i in range(2)]
    assert [i["process_id"] for i in infos] == [0, 1]
    assert all(
        i["num_processes"] == 2 and i["global_devices"] == 8 and i["local_devices"] == 4 for i in infos
    )
    assert [i["is_coordinator"] for i in infos] == [True, False]


def test_checkpoint_from_two_processes_reads_back_everywhere(tmp_path):
    x, _ = _global_inputs()
    results = run_cluster("ckpt", tmp_path)
    for r in results:
        assert bool(r["local_ok"])
        assert int(r["n_local_shards"]) == 4  # each process holds only its half of the 8 shards
        np.testing.assert_array_equal(r["x"], x)
    # One process with all 8 devices reads the folder both processes wrote, resharded to another layout.
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    meta = ocp.StandardCheckpointer().metadata(tmp_path / "ckpt").item_metadata
    abstract = {
        k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(mesh, P(None, "fsdp")))
        for k, m in meta.items()
    }
    back = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", abstract)
    np.testing.assert_array_equal(np.asarray(back["x"]), x)
    assert back["x"].sharding.spec == P(None, "fsdp")


@pytest.mark.slow  # ~45 s on 2 busy cores: three processes compile the train step
def test_sharded_train_step_two_processes_matches_one(tmp_path):
    two = run_cluster("train", tmp_path / "two")
    one = run_cluster("train", tmp_path / "one", num_processes=1, devices_per_process=8)[0]
    assert np.all(np.isfinite(one["losses"])) and one["losses"][2] < one["losses"][0]
    for r in two:
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=2e-5)
        assert int(r["meta_step"]) == 2
        # Resuming from the checkpoint both processes wrote gives exactly the uninterrupted step.
        assert float(r["loss_restored"]) == float(r["losses"][2])
        names = [k[2:] for k in r if k.startswith("p/")]
        assert names
        for n in names:
            np.testing.assert_allclose(r["p/" + n], one["p/" + n], rtol=1e-4, atol=1e-6, err_msg=n)
            np.testing.assert_array_equal(r["r/" + n], r["p/" + n], err_msg=n)
    assert sorted(p.name for p in (tmp_path / "two" / "run" / "checkpoints").iterdir()) == ["2"]


def _write_ckpt(path, tree, cfg):
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", tree)
    ckptr.wait_until_finished()
    meta = ckpt_format.make_meta(cfg.to_dict(), 0)
    ckpt_format.write_meta(path, {k: v for k, v in meta.items() if k not in ("format", "version")})


def test_sharded_merge_two_processes_matches_one_and_numpy(tmp_path):
    import jax

    from ptm.ckpt.params import load_params
    from ptm.model.llama import abstract_params

    from .mp_worker import tiny_model_config

    cfg = tiny_model_config()
    rng = np.random.default_rng(5)
    trees = {
        k: jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract_params(cfg))
        for k in ("pre", "general", "skill")
    }
    for k, t in trees.items():
        _write_ckpt(tmp_path / k, t, cfg)
    args = [str(tmp_path / k) for k in ("pre", "general", "skill")]
    two = run_cluster("merge", tmp_path / "two", *args, str(tmp_path / "merged2"))
    one = run_cluster(
        "merge", tmp_path / "one", *args, str(tmp_path / "merged1"), num_processes=1, devices_per_process=8
    )[0]
    # Each process wrote about half of the bytes; together as much as the single process.
    w = [int(r["bytes_written"]) for r in two]
    assert all(x > 0 for x in w) and sum(w) == int(one["bytes_written"])
    got2, meta = load_params(tmp_path / "merged2")
    got1, _ = load_params(tmp_path / "merged1")
    assert meta is not None and meta["model"]["num_layers"] == cfg.num_layers
    want = jax.tree.map(
        lambda g, p, s: g + np.float32(0.3) * (s - p), trees["general"], trees["pre"], trees["skill"]
    )
    for a, b, c in zip(jax.tree.leaves(got2), jax.tree.leaves(got1), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), c, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~1 min on 2 busy cores
def test_training_loop_two_processes_resumes_and_matches_one(tmp_path):
    from ptm.ckpt.params import load_params

    data = write_reverse_task(tmp_path / "rev.jsonl", n=48)
    two = run_cluster("loop", tmp_path / "two", str(data), str(tmp_path / "run2"), timeout=400)
    one = run_cluster(
        "loop",
        tmp_path / "one",
        str(data),
        str(tmp_path / "run1"),
        num_processes=1,
        devices_per_process=8,
        timeout=400,
    )[0]
    assert int(one["resumed_from"]) == 2 and int(one["steps"]) > 2
    for res in two:
        assert int(res["resumed_from"]) == 2 and int(res["steps"]) == int(one["steps"])
        np.testing.assert_allclose(res["final_loss"], one["final_loss"], rtol=1e-4)
    p2, _ = load_params(tmp_path / "run2")
    p1, _ = load_params(tmp_path / "run1")
    import jax

    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_generate_and_loglik_two_processes_equal_one_bit_for_bit(tmp_path):
    two = run_cluster("decode", tmp_path / "two")
    one = run_cluster("decode", tmp_path / "one", num_processes=1, devices_per_process=8)[0]
    for r in two:
        for k in ("tokens", "logprobs", "finish", "ll", "ll_n", "ll_greedy"):
            np.testing.assert_array_equal(r[k], one[k], err_msg=k)
        np.testing.assert_array_equal(r["eager_tokens"], one["tokens"])  # prompts read eagerly: the same
    shares = [int(r["host_tokens"]) for r in two]
    assert sum(shares) == int(one["host_tokens"]) and min(shares) > 0
    # 13 prompts, batches of 8 over 8 devices: the last batch's 3 padding rows are spread over the devices, so
    # each host has 4 + 2 or 4 + 3 real rows, and it tokenizes (reads) just those
    for k, n in (("gen_read", 13), ("ll_read", len(one["ll"]))):
        a, b = (set(r[k].tolist()) for r in two)
        assert not a & b and a | b == set(range(n)) == set(one[k].tolist()), k
        assert abs(len(a) - len(b)) <= 1, (k, len(a), len(b))


def test_single_process_is_a_noop(monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(distributed.ENV_TPU_VM, "0")
    info = distributed.initialize()
    assert info.mode == "single" and info.num_processes == 1 and info.is_coordinator
    assert distributed.initialize(num_processes=1).mode == "single"


@pytest.mark.parametrize(
    "kwargs, env, match",
    [
        ({"num_processes": 2}, {}, "missing: PTM_COORDINATOR, PTM_PROCESS_ID"),
        (
            {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2},
            {},
            "not in \\[0, 2\\)",
        ),
        ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        ({}, {"PTM_NUM_PROCESSES": "two"}, "PTM_NUM_PROCESSES='two'"),
    ],
)
def test_bad_cluster_settings_raise_config_error(monkeypatch, kwargs, env, match):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        distributed.initialize(**kwargs)


def test_joining_after_devices_started_is_a_clear_error(monkeypatch):
    import jax

    jax.devices()  # the pytest process has started its CPU backend
    monkeypatch.setenv(distributed.ENV_TPU_VM, "0")
    with pytest.raises(ConfigError, match="already initialised"):
        distributed.initialize("127.0.0.1:1", 2, 0)
