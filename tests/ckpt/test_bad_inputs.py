"""Corrupt checkpoints (issue 12, items 6, 9, 10, 11): each is refused with a PtmError that names the file, the
tensor and what is wrong — never read as zeros, never a traceback from deep inside jax or Orbax."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import jax
import numpy as np
import pytest
import tensorstore as ts

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import stores as S
from ptm.ckpt.params import load_params
from ptm.cli import main
from ptm.errors import CheckpointError
from ptm.merge import engine
from ptm.merge.recipe import Recipe
from ptm.model.llama import init_params
from ptm.train.checkpoint import RunCheckpointer
from ptm.train.loop import train
from tests.merge.conftest import ckpts, random_tree, restore, save_safetensors  # noqa: F401 (fixture)
from tests.train.conftest import OPT, TINY, data_config, write_reverse_task


def ta(pre, general, skill, out=None, **kw) -> Recipe:
    return Recipe("task_arithmetic", {"pre": pre, "general": general, "skills": [skill]}, weights=0.3,
                  out=None if out is None else str(out), **kw)


def save_run(run, tree, steps=(1,), meta_model=None) -> str:
    """A real training run dir written by ptm's RunCheckpointer (Orbax OCDBT, as `ptm train` writes it)."""
    ck = RunCheckpointer(run, save_every=1, async_save=False)
    for step in steps:
        meta = ckpt_format.make_meta(meta_model or {}, step=step)
        ck.save(step, {"params": tree, "opt_state": {"count": np.zeros((), np.int32)}}, None, meta, force=True)
    ck.close()
    return str(run)


# ------------------------------------------------------------------------ item 6: a missing zarr chunk


@pytest.fixture
def merged_multichunk(tmp_path, ckpts, monkeypatch):  # noqa: F811
    """A `ptm merge` output whose tensors are stored in several chunks (small pieces), plus the inputs."""
    paths, _ = ckpts
    monkeypatch.setattr(engine, "PIECE_BYTES", 1024)  # w_up [3, 16, 24] -> chunks [1, 8, 24]: 6 chunk files
    out = tmp_path / "m"
    engine.merge(ta(paths["pre"], paths["general"], paths["s1"], out), progress=False, summary=False)
    monkeypatch.undo()
    files = sorted(f for f in os.listdir(out / "params" / "layers.mlp.w_up") if not f.startswith("."))
    assert len(files) == 6 and "1.1.0" in files
    return paths, out


def test_missing_chunk_of_a_merge_output_is_refused_by_merge_and_in_memory_merge(tmp_path, merged_multichunk):
    paths, m = merged_multichunk
    os.remove(m / "params" / "layers.mlp.w_up" / "1.1.0")  # one chunk of six of one tensor
    want = rf"{m}/params tensor 'layers.mlp.w_up': chunk \{{1, 1, 0\}} .*is missing: the checkpoint is incomplete"
    with pytest.raises(CheckpointError, match=want):
        engine.merge(ta(paths["pre"], str(m), paths["s1"], tmp_path / "again"), progress=False, summary=False)
    assert not (tmp_path / "again").exists()
    with pytest.raises(CheckpointError, match=want):  # ptm eval --recipe, the experiment, the search pool
        engine.merge_to_tree(ta(paths["pre"], str(m), paths["s1"]))
    # The other chunks and tensors still read, and give what was written.
    st = S.OrbaxStore(m)
    st.tensors()
    assert st.read("layers.mlp.w_up", (slice(0, 1), slice(0, 16), slice(0, 24))).shape == (1, 16, 24)


def test_missing_chunk_cli_exit_2(tmp_path, merged_multichunk, capsys):
    paths, m = merged_multichunk
    os.remove(m / "params" / "layers.mlp.w_up" / "0.0.0")
    rc = main(["merge", "--method", "task_arithmetic", "--pre", paths["pre"], "--general", str(m), "--skill",
               paths["s1"], "--omega", "0.3", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(m) in err and "'layers.mlp.w_up'" in err and "chunk {0, 0, 0}" in err and "0.0.0" in err
    assert not (tmp_path / "o").exists()


def test_missing_chunk_refused_from_the_zarr_fill_value_alone(tmp_path, merged_multichunk):
    """Without Orbax's `store_array_data_equal_to_fill_value` flag (older writers), an array with a null fill
    value has every written chunk stored: a missing one is still corruption."""
    paths, m = merged_multichunk
    md = json.loads((m / "params" / "_METADATA").read_text())
    del md["store_array_data_equal_to_fill_value"]
    (m / "params" / "_METADATA").write_text(json.dumps(md))
    os.remove(m / "params" / "layers.mlp.w_up" / "1.1.0")
    with pytest.raises(CheckpointError, match=r"'layers.mlp.w_up': chunk \{1, 1, 0\}"):
        engine.merge_to_tree(ta(paths["pre"], str(m), paths["s1"]))


def test_sparse_array_with_a_fill_value_still_reads_its_fill_value(tmp_path, merged_multichunk):
    """What tensorstore may legitimately leave out — chunks equal to a declared fill value, from a writer that
    does not store those — still reads as the fill value (the rule is Orbax's, not "every chunk")."""
    _, m = merged_multichunk
    md = json.loads((m / "params" / "_METADATA").read_text())
    md["store_array_data_equal_to_fill_value"] = False
    (m / "params" / "_METADATA").write_text(json.dumps(md))
    za = m / "params" / "final_norm.scale" / ".zarray"
    z = json.loads(za.read_text())
    z["fill_value"] = 0.0
    za.write_text(json.dumps(z))
    os.remove(m / "params" / "final_norm.scale" / "0")
    st = S.OrbaxStore(m)
    st.tensors()
    assert not st.read("final_norm.scale", (slice(0, 16),)).astype(np.float32).any()


def test_missing_chunk_of_a_training_checkpoint_is_refused(tmp_path, ckpts):  # noqa: F811
    """A ptm training checkpoint (Orbax OCDBT): a chunk absent from the OCDBT manifest."""
    paths, _ = ckpts
    run = save_run(tmp_path / "run", random_tree(7))
    params = tmp_path / "run" / "checkpoints" / "1" / "params"
    kv = ts.KvStore.open({"driver": "ocdbt", "base": S.kvstore_url(params)}).result()
    assert b"layers.mlp.w_up/0.0.0" in kv.list().result()
    del kv["layers.mlp.w_up/0.0.0"]
    want = rf"{params} tensor 'layers.mlp.w_up': chunk \{{0, 0, 0\}} .*OCDBT.* is missing"
    with pytest.raises(CheckpointError, match=want):
        engine.merge(ta(paths["pre"], run, paths["s1"], tmp_path / "o"), progress=False, summary=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match=want):
        engine.merge_to_tree(ta(paths["pre"], run, paths["s1"]))
    with pytest.raises(CheckpointError, match="cannot read params"):  # what eval/init_from do: Orbax agrees
        load_params(run)


def test_complete_multichunk_checkpoint_merges_as_before(tmp_path, merged_multichunk):
    """Complete inputs merge exactly as before (the check is a tensorstore open option, no extra I/O)."""
    paths, m = merged_multichunk
    out = tmp_path / "again"
    engine.merge(ta(paths["pre"], str(m), paths["s1"], out), progress=False, summary=False)
    tree = engine.merge_to_tree(ta(paths["pre"], str(m), paths["s1"]))
    got = restore(str(out))
    assert all(np.array_equal(got[n].view(np.uint16), tree_flat.view(np.uint16))
               for n, tree_flat in _flat(tree).items())


def _flat(t, prefix=""):
    out = {}
    for k, v in t.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ---------------------------------------------- item 9: ptm/metadata that is not UTF-8, through the CLI


@pytest.fixture
def corrupt_meta_run(tmp_path):
    """A tiny real training run (steps 1 and 2) whose newest step's ptm/metadata holds a byte 0xff."""
    params = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
    run = save_run(tmp_path / "run", params, steps=(1, 2), meta_model=TINY.to_dict())
    f = tmp_path / "run" / "checkpoints" / "2" / "ptm" / "metadata"
    f.write_bytes(f.read_bytes().replace(b'"format"', b'"\xffformat"'))
    return run, str(f)


def _assert_named(err: str, f: str) -> None:
    assert f in err and "not UTF-8" in err, err
    assert "UnicodeDecodeError" not in err and "Traceback" not in err


def test_non_utf8_metadata_inspect_merge_eval(tmp_path, corrupt_meta_run, capsys):
    run, f = corrupt_meta_run
    assert main(["inspect", run]) == 2
    _assert_named(capsys.readouterr().err, f)
    rc = main(["merge", "--method", "linear", "--model", run, "--model", run, "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2
    _assert_named(capsys.readouterr().err, f)
    assert not (tmp_path / "o").exists()
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"task": "t", "messages": [{"role": "user", "content": "q"}], "reference": "a",
                                 "scorer": "exact_match"}) + "\n")
    assert main(["eval", run, "--suite", str(suite), "--no-progress"]) == 2
    _assert_named(capsys.readouterr().err, f)


def test_non_utf8_metadata_training_resume(tmp_path, corrupt_meta_run, capsys):
    run, f = corrupt_meta_run
    data = write_reverse_task(tmp_path / "rev.jsonl")
    flags = ["--gin_file=models/tiny.gin", "--gin_file=meshes/cpu.gin", "--gin_file=runs/sft.gin",
             "--gin_file=runs/toy.gin", "--gin.BASE_CKPT=None", f"--gin.GENERAL_DATA='{data}'"]
    assert main(["train", *flags, f"--run_dir={run}"]) == 2
    _assert_named(capsys.readouterr().err, f)
    # The run dir is untouched: step 1 is still there to fall back to by hand.
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["1", "2"]


# ------------------------------------------ item 10: init_from a checkpoint with a corrupt params/_METADATA


def _drop_first(md: dict) -> dict:
    md["tree_metadata"].pop(next(iter(md["tree_metadata"])))
    return md


def _rename_first(md: dict) -> dict:
    k = next(iter(md["tree_metadata"]))  # "('embed', 'embedding')"
    e = md["tree_metadata"].pop(k)
    e["key_metadata"][-1]["key"] = "bogus"
    md["tree_metadata"][k.replace("'embedding'", "'bogus'")] = e
    return md


def _add_extra(md: dict) -> dict:
    k = next(iter(md["tree_metadata"]))
    e = json.loads(json.dumps(md["tree_metadata"][k]))
    md["tree_metadata"][k.replace("'embedding'", "'extra'")] = e
    e["key_metadata"][-1]["key"] = "extra"
    return md


@pytest.mark.parametrize(
    "corrupt,want",
    [
        (lambda text: text[: len(text) // 2], r"_METADATA is not valid JSON, truncated or corrupt"),
        (lambda text: "", r"_METADATA is not valid JSON"),
        (lambda text: "[1, 2]", r"_METADATA has no tree_metadata entries"),
        (lambda text: json.dumps(_drop_first(json.loads(text))), r"missing tensor 'embed.embedding'"),
        (lambda text: json.dumps(_rename_first(json.loads(text))), r"tensor 'embed.bogus' is missing"),
        (lambda text: json.dumps(_add_extra(json.loads(text))), r"tensor 'embed.extra' is missing"),
    ],
    ids=["truncated", "empty", "not-an-object", "tensor-dropped", "tensor-renamed", "tensor-added"],
)
def test_init_from_corrupt_params_metadata(tmp_path, corrupt, want):
    params = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
    src = save_run(tmp_path / "src", params, meta_model=TINY.to_dict())
    md = tmp_path / "src" / "checkpoints" / "1" / "params" / "_METADATA"
    md.write_text(corrupt(md.read_text()))
    data = write_reverse_task(tmp_path / "rev.jsonl")
    with pytest.raises(CheckpointError) as e:
        train(str(tmp_path / "r"), data_config(data), model=TINY, optimizer=OPT, progress=False, init_from=src,
              stop_after_steps=1)
    msg = str(e.value)
    assert str(md.parent) in msg
    assert re.search(want, msg), msg
    assert not (tmp_path / "r" / "checkpoints").exists() or not os.listdir(tmp_path / "r" / "checkpoints")


def test_load_params_tree_checked_against_the_model(tmp_path):
    """A checkpoint of another tree (valid metadata, other tensors) is listed tensor by tensor."""
    params = jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))
    params = {**params, "extra": {"w": np.zeros(3, np.float32)}}
    del params["final_norm"]
    # ptm/metadata says TINY (check_same_model passes): only the tensor tree can tell.
    src = save_run(tmp_path / "src", params, meta_model=TINY.to_dict())
    with pytest.raises(CheckpointError, match=r"2 problem\(s\)\): missing tensor 'final_norm.scale'; "
                                              r"extra tensor 'extra.w'"):
        load_params(src, model_config=TINY)


# ------------------------------------------------------- item 11: safetensors header with bad dimensions


def _patch_header(f, fn) -> None:
    raw = open(f, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    h = json.loads(raw[8 : 8 + n])
    fn(h)
    hb = json.dumps(h).encode()
    open(f, "wb").write(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


@pytest.mark.parametrize("shape", [[-64, -8], [64, -8, -1], [64.0, 8], [True, 512], "512", None],
                         ids=["two-negative", "three-negative", "float", "bool", "string", "null"])
def test_safetensors_bad_shape_refused_by_inspect_and_merge(tmp_path, capsys, shape):
    p = save_safetensors(tmp_path / "st", {"a": np.ones((64, 8), np.float32), "b": np.ones(4, np.float32)})
    f = f"{p}/model.safetensors"
    _patch_header(f, lambda h: h["a"].__setitem__("shape", shape))
    assert main(["inspect", p]) == 2
    err = capsys.readouterr().err
    assert f in err and "tensor 'a'" in err and "non-negative integers" in err, err
    with pytest.raises(CheckpointError, match=rf"{f}: tensor 'a' has shape"):
        engine.merge(Recipe("linear", {"models": [p, p]}, out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()


def test_safetensors_bad_offsets_refused(tmp_path):
    p = save_safetensors(tmp_path / "st", {"a": np.ones((4, 4), np.float32)})
    f = f"{p}/model.safetensors"
    _patch_header(f, lambda h: h["a"].__setitem__("data_offsets", [-64, 0]))
    with pytest.raises(CheckpointError, match=rf"{f}: tensor 'a' has data_offsets \[-64, 0\]"):
        S.open_store(p)
    shutil.rmtree(p)
