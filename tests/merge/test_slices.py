"""Frankenmerges (`slices` / `layer_range`): the output's layers are ranges of the inputs' layers, its layer count
the sum of the ranges; passthrough and other methods over aligned slices; stacked ptm tensors and HF names."""

from __future__ import annotations

import numpy as np
import pytest

from ptm.ckpt import format as ckpt_format
from ptm.ckpt import stores
from ptm.errors import ConfigError, MergeError
from ptm.merge import engine, recipe
from ptm.merge.recipe import Recipe
from tests.merge.conftest import f32, random_tree, restore, save_orbax


@pytest.fixture
def two(tmp_path):
    from ptm.ckpt.tree import flatten

    trees = [random_tree(i) for i in range(3)]
    paths = [save_orbax(tmp_path / f"m{i}", t) for i, t in enumerate(trees)]
    return paths, [flatten(t) for t in trees]


def test_passthrough_frankenmerge_stacked(two, tmp_path):
    (a, b, _), (ta, tb, _) = two
    out = str(tmp_path / "frank")
    r = recipe.from_dict({"method": "passthrough", "inputs": {"models": [a]}, "out": out, "slices": [
        {"sources": [[0, 2]]}, {"sources": [{"model": b, "layer_range": [1, 3]}]},
        {"sources": [{"model": a, "layer_range": [2, 3]}]}]})
    engine.merge(r, progress=False, summary=False)
    got = restore(out)
    for n in ta:
        if n.startswith("layers."):
            want = np.concatenate([ta[n][0:2], tb[n][1:3], ta[n][2:3]])
            assert got[n].shape[0] == 5 and np.array_equal(got[n], want), n
        elif "embed" in n:
            assert np.array_equal(got[n], ta[n])
        else:  # final norm: the last slice's model
            assert np.array_equal(got[n], ta[n])
    assert ckpt_format.read_meta(out)["model"]["num_layers"] == 5


def test_aligned_slices_task_arithmetic(two, tmp_path):
    (p, s1, s2), (tp, t1, t2) = two
    out = str(tmp_path / "ta")
    r = Recipe("task_arithmetic", {"pre": p, "skills": [s1, s2]}, weights=[0.5, 0.25], out=out,
               output_dtype="float32", slices=[{"layer_range": [0, 1]}, {"layer_range": [2, 3]},
                                               {"sources": [[1, 2], [1, 2], [0, 1]]}])
    engine.merge(r, progress=False, summary=False)
    got = restore(out)
    n = "layers.mlp.w_up"
    rng = {0: ([0], [0], [0]), 1: ([2], [2], [2]), 2: ([1], [1], [0])}
    for j, (ip, i1, i2) in rng.items():
        pre = f32(tp[n][ip[0]])
        want = pre + np.float32(0.5) * (f32(t1[n][i1[0]]) - pre) + np.float32(0.25) * (f32(t2[n][i2[0]]) - pre)
        np.testing.assert_allclose(got[n][j], want, atol=1e-6)
    assert got[n].shape[0] == 3


def test_sharded_frankenmerge_equals_unsharded(two, tmp_path):
    import jax

    (a, b, _), _ = two
    sl = [{"sources": [[0, 3]]}, {"sources": [{"model": b, "layer_range": [0, 3]}]}, {"sources": [[1, 2]]}]
    outs = []
    for i, mesh in enumerate([None, jax.make_mesh((8,), ("d",))]):
        r = Recipe("passthrough", {"models": [a]}, out=str(tmp_path / f"o{i}"), slices=sl)
        engine.merge(r, mesh=mesh, progress=False, summary=False)
        outs.append(restore(r.out))
    for n in outs[0]:
        assert np.array_equal(outs[0][n], outs[1][n]), n


def test_slice_errors(two, tmp_path):
    (a, b, _), _ = two
    with pytest.raises(MergeError, match=r"layer_range \[2, 5\) is past its last layer"):
        engine.merge(Recipe("passthrough", {"models": [a]}, out=str(tmp_path / "x"),
                            slices=[{"sources": [[2, 5]]}]), progress=False, summary=False)
    assert not (tmp_path / "x").exists()
    for bad, msg in [([], "non-empty"), ([{"sources": [[0, 1], [0, 1]]}], "one source per input"),
                     ([{"layer_range": [2, 1]}], "start < stop"), ([{"foo": 1}], "a slice is")]:
        with pytest.raises(ConfigError, match=msg):
            recipe.from_dict({"method": "passthrough", "inputs": {"models": [a]}, "slices": bad})
    with pytest.raises(ConfigError, match="differ in length"):
        recipe.from_dict({"method": "linear", "inputs": {"models": [a, b]}, "slices": [
            {"sources": [[0, 1], [0, 2]]}]})


def test_hf_frankenmerge_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.merge.test_hf_output import _tiny

    a, b = _tiny(tmp_path / "a", 0), _tiny(tmp_path / "b", 1)  # 2 layers each
    out = str(tmp_path / "out")
    r = Recipe("passthrough", {"models": [a]}, out=out, slices=[
        {"sources": [[0, 2]]}, {"sources": [{"model": b, "layer_range": [0, 2]}]}, {"sources": [[1, 2]]}])
    engine.merge(r, progress=False, summary=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 5
    sa, sb, so = (stores.open_store(p) for p in (a, b, out))
    pairs = {0: (sa, 0), 1: (sa, 1), 2: (sb, 0), 3: (sb, 1), 4: (sa, 1)}
    for j, (st, i) in pairs.items():
        n = "model.layers.{}.self_attn.q_proj.weight"
        assert np.array_equal(so.read(n.format(j), ()), st.read(n.format(i), ())), j
        got = model.model.layers[j].self_attn.q_proj.weight.detach().float().numpy()
        assert np.array_equal(got, f32(st.read(n.format(i), ())))
    assert np.array_equal(so.read("model.norm.weight", ()), sa.read("model.norm.weight", ()))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    stack = engine.plan([r]).stores[0]  # a layer's tensors are its source's mapped pages
    assert stack.reads_are_views("model.layers.3.self_attn.q_proj.weight")
    assert stack.reads_are_views("model.norm.weight")


def test_stacked_slices_are_copies_not_views(two, tmp_path):
    raw = []
    for i, p in enumerate(two[0][:2]):  # merge outputs are uncompressed: read as views of their mapped files
        raw.append(str(tmp_path / f"raw{i}"))
        engine.merge(Recipe("linear", {"models": [p]}, weights=[1.0], out=raw[-1], output_format="orbax"),
                     progress=False, summary=False)
        assert stores.open_store(raw[-1]).reads_are_views("layers.mlp.w_up")
    r = recipe.from_dict({"method": "passthrough", "inputs": {"models": [raw[0]]}, "out": str(tmp_path / "f"),
                          "slices": [{"sources": [[0, 2]]}, {"sources": [{"model": raw[1], "layer_range": [1, 3]}]}]})
    stack = engine.plan(r).stores[0]  # from_dict: a list of recipes
    assert not stack.reads_are_views("layers.mlp.w_up")  # concatenated from two inputs
    assert stack.reads_are_views("embed.embedding")  # one input's own tensor


def test_example_mergekit_configs_parse():
    import glob
    import os

    from ptm.merge import mergekit_yaml

    root = os.path.join(os.path.dirname(__file__), "../../configs/merges")
    files = sorted(glob.glob(f"{root}/*.yml"))
    assert len(files) >= 4
    got = {os.path.basename(f): mergekit_yaml.load(f, out="o")[0] for f in files}
    frank = got["mergekit_frankenmerge.yml"]
    assert frank.method == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in frank.slices] == [[0, 12], [4, 16]]
    assert got["mergekit_ties_union_tokenizer.yml"].tokenizer == "union"
    assert got["mergekit_slerp_slices.yml"].slices and got["mergekit_slerp_slices.yml"].method == "slerp"
    (toml,) = recipe.load(f"{root}/frankenmerge.toml")
    assert toml.slices[1]["sources"][1]["model"] == "runs/skill-code"


def test_cli_runs_a_mergekit_frankenmerge(two, tmp_path):
    import yaml

    from ptm import cli

    (a, b, _), (ta, tb, _) = two
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                                      {"sources": [{"model": b, "layer_range": [2, 3]}]}]}
    p = tmp_path / "frank.yml"
    p.write_text(yaml.safe_dump(cfg))
    assert cli.main(["merge", str(p), "--out", str(tmp_path / "o")]) == 0
    got = restore(str(tmp_path / "o"))
    n = "layers.mlp.w_up"
    assert np.array_equal(got[n], np.concatenate([ta[n][:2], tb[n][2:]]))
    assert np.array_equal(got["final_norm.scale"], tb["final_norm.scale"])  # the last slice's model
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({**cfg, "slices": [{"sources": [{"model": a, "layer_range": [0, 9]}]}]}))
    assert cli.main(["merge", str(bad), "--out", str(tmp_path / "o2")]) != 0
    assert not (tmp_path / "o2").exists()
