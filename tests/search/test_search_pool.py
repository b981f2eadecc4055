"""The resident, sharded pool: in-memory candidates equal engine-written merges bit for bit; bad pools
fail with every problem listed."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from searchhelpers import TINY, make_pool

from ptm.ckpt.params import load_params
from ptm.ckpt.tree import flatten
from ptm.errors import CheckpointError, ConfigError, MergeError
from ptm.merge import engine
from ptm.parallel.mesh import MeshConfig, make_mesh
from ptm.search.pool import Pool
from ptm.search.space import Space


def _bits(tree):
    return {k: np.asarray(jax.device_get(v)).view(np.uint32) for k, v in flatten(tree).items()}


@pytest.mark.parametrize("kind,layer_groups", [("simplex", 0), ("simplex", 2), ("task_vector", 1)])
def test_in_memory_candidate_equals_engine_output(pool_dir, tmp_path, kind, layer_groups):
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    assert mesh.size == 8
    pool = Pool(pool_dir["members"], pool_dir["base"] if kind == "task_vector" else None, mesh=mesh)
    sp = Space(n=pool.n, kind=kind, layer_groups=layer_groups)
    rng = np.random.default_rng(1)
    w = sp.weights(rng.standard_normal(sp.dim))
    cand = pool.merge(w, sp)
    # the pool and the candidate live sharded on the mesh (member axis replicated)
    wq = pool.stacked["layers.attention.wq"]
    assert len(wq.sharding.device_set) == 8 and wq.sharding.spec[0] is None
    assert not flatten(cand)["layers.attention.wq"].sharding.is_fully_replicated
    out = str(tmp_path / "merged")
    engine.merge(pool.recipe(w, sp, out), progress=False)
    disk, _ = load_params(out)
    a, b = _bits(cand), _bits(disk)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # and it is really a weighted merge: not equal to any member
    m0 = _bits(pool.member_params(0))
    assert not np.array_equal(a["layers.mlp.w_up"], m0["layers.mlp.w_up"])


def test_pool_member_order_and_values(pool_dir):
    pool = Pool(pool_dir["members"])
    sp = Space(n=pool.n)
    one_hot = np.eye(pool.n)[[1]]
    got = flatten(pool.merge(one_hot, sp))
    want, _ = load_params(pool_dir["members"][1])
    for k, v in flatten(want).items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))


def test_glob_pool(pool_dir):
    import os

    root = os.path.dirname(pool_dir["members"][0])
    pool = Pool([os.path.join(root, "m*")])
    assert pool.members == sorted(pool_dir["members"])
    with pytest.raises(CheckpointError, match="matches nothing"):
        Pool([os.path.join(root, "zz*")])


def test_mismatched_pool_lists_every_problem(pool_dir, tmp_path):
    other = make_pool(tmp_path, n=1, base=False, model={**TINY, "mlp_dim": 96})["members"][0]
    with pytest.raises(MergeError) as e:
        Pool([pool_dir["members"][0], other])
    msg = str(e.value)
    for t in ("layers.mlp.w_up", "layers.mlp.w_gate", "layers.mlp.w_down"):
        assert t in msg and other in msg
    with pytest.raises(CheckpointError) as e:
        Pool([pool_dir["members"][0], str(tmp_path / "nope1"), str(tmp_path / "nope2")])
    assert "nope1" in str(e.value) and "nope2" in str(e.value)
    with pytest.raises(ConfigError, match="twice"):
        Pool([pool_dir["members"][0], pool_dir["members"][0]])


def test_space_errors(pool_dir):
    pool = Pool(pool_dir["members"])
    with pytest.raises(ConfigError, match="base"):
        pool.coefficient_fn(Space(n=pool.n, kind="task_vector"))
    with pytest.raises(ConfigError, match="layer_groups"):
        pool.coefficient_fn(Space(n=pool.n, layer_groups=5))


@pytest.mark.gcs
def test_pool_from_gcs_glob_matches_local(pool_dir, gcs_bucket):
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    for i, m in enumerate(pool_dir["members"][:2]):
        fs.put(m, f"{gcs_bucket}/pool/m{i}", recursive=True)
    remote = Pool([f"{gcs_bucket}/pool/m*"])
    assert remote.members == [f"{gcs_bucket}/pool/m0", f"{gcs_bucket}/pool/m1"]
    local = Pool(pool_dir["members"][:2])
    w = np.array([[0.3, 0.7]])
    a, b = _bits(remote.merge(w, Space(n=2))), _bits(local.merge(w, Space(n=2)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
