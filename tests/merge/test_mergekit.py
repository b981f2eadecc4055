"""mergekit YAML configs run as they are, and agree with the real mergekit (skipped when it is not installed in
a separate venv: MERGEKIT_YAML or /tmp/mk/bin/mergekit-yaml)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import yaml

from ptm.errors import ConfigError
from ptm.merge import engine, mergekit_yaml

MK = os.environ.get("MERGEKIT_YAML", "/tmp/mk/bin/mergekit-yaml")


def test_translate_and_errors():
    cfg = {"merge_method": "ties", "base_model": "b", "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": "a", "parameters": {"weight": [0, 0.5, 1], "density": 0.5}},
                      {"model": "c", "parameters": {"weight": 0.3, "density": 0.7}}, {"model": "b"}],
           "parameters": {"normalize": False}}
    (r,) = mergekit_yaml.translate(cfg, out="o")
    assert r.method == "ties" and r.inputs == {"pre": "b", "skills": ["a", "c"]} and r.convention == "mergekit"
    assert r.weights == [{"anchors": [0.0, 0.5, 1.0], "default": 0.0}, 0.3] and r.density == [0.5, 0.7]
    assert r.normalize is False and r.output_dtype == "bfloat16"
    (d,) = mergekit_yaml.translate({"merge_method": "dare_ties", "base_model": "b",
                                    "models": [{"model": "a", "parameters": {"density": 0.6, "weight": 1}}]})
    assert abs(d.drop_rate - 0.4) < 1e-12
    for bad, key in [({"merge_method": "ties", "slices": []}, "slices"), ({"merge_method": "x"}, "x"),
                     ({"merge_method": "linear", "models": ["a"], "foo": 1}, "foo"),
                     ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"bar": 1}}]}, "bar"),
                     ({"merge_method": "linear", "models": ["a"], "tokenizer": {"source": "union", "tokens": {
                         "<x>": {"source": "z"}}}}, "'z' is not one of the inputs"),
                     ({"merge_method": "linear", "models": ["a"], "tokenizer_source": "c"}, "one of the models"),
                     ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]},
                                                            {"sources": [{"model": "a", "layer_range": [1, 2],
                                                                          "parameters": {"density": 2}}]}]},
                      "'density' of a differs"),
                     ({"merge_method": "linear", "models": ["a"], "slices": []}, "not both"),
                     ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1],
                                                                          "parameters": {"weight": [
                                                                              {"filter": "mlp", "value": 2},
                                                                              {"value": 1}]}}]}]},
                      "filter")]:
        with pytest.raises(ConfigError, match=key):
            mergekit_yaml.translate(bad)
    f = mergekit_yaml.translate({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}},
        {"model": "c", "parameters": {"weight": 1.0}}]}, tensor_names=["x.mlp.w", "x.attn.w"])[0]
    assert f.weights == [1.0, 1.0] and len(f.overrides) == 1 and f.overrides[0]["weights"] == [2.0, 1.0]


def test_karcher_takes_the_base_and_equal_weights():
    """mergekit 0.1.5's karcher averages every entry, base_model included, with equal weights (its `weight`s have
    no effect: measured on the 1.1B bench, 99.8 % of elements differed when ptm dropped the base and used them)."""
    cfg = {"merge_method": "karcher", "base_model": "b",
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "c", "parameters": {"weight": 0.3}}]}
    with pytest.warns(UserWarning, match="no effect on karcher"):
        (r,) = mergekit_yaml.translate(cfg)
    assert r.inputs == {"models": ["b", "a", "c"]} and r.weights == [1.0, 1.0, 1.0]
    (r,) = mergekit_yaml.translate({"merge_method": "karcher", "base_model": "a", "models": ["a", "c"]})
    assert r.inputs == {"models": ["a", "c"]} and r.weights == [1.0, 1.0]


def _models(tmp_path):
    import torch
    import transformers

    paths = []
    for seed in range(3):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        m = transformers.LlamaForCausalLM(cfg)
        if seed:  # fine-tunes of model 0: small random task vectors
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        p = str(tmp_path / f"m{seed}")
        m.to(torch.bfloat16).save_pretrained(p)
        paths.append(p)
    return paths


CONFIGS = {
    "linear": {"models": [{"model": 1, "parameters": {"weight": 0.3}}, {"model": 2, "parameters": {"weight": 0.7}}]},
    "task_arithmetic": {"base_model": 0, "models": [{"model": 1, "parameters": {"weight": [0.2, 1.0]}},
                                                    {"model": 2, "parameters": {"weight": 0.5}}]},
    "ties": {"base_model": 0, "models": [{"model": 1, "parameters": {"weight": 1.0, "density": 0.5}},
                                         {"model": 2, "parameters": {"weight": 0.5, "density": 0.3}}]},
    "slerp": {"base_model": 1, "models": [{"model": 1}, {"model": 2}], "parameters": {"t": 0.3}},
    "nuslerp": {"base_model": 0, "models": [{"model": 1, "parameters": {"weight": 0.4}},
                                            {"model": 2, "parameters": {"weight": 0.6}}]},
    "breadcrumbs_ties": {"base_model": 0, "models": [
        {"model": 1, "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}},
        {"model": 2, "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}}]},
    "model_stock": {"base_model": 0, "models": [{"model": 1}, {"model": 2}]},
    "nearswap": {"base_model": 1, "models": [{"model": 1}, {"model": 2}], "parameters": {"t": 0.01}},
    "sce": {"base_model": 0, "models": [{"model": 1}, {"model": 2}], "parameters": {"select_topk": 0.5}},
    "karcher": {"models": [{"model": 1}, {"model": 2}]},
    "karcher-base": {"base_model": 0, "models": [{"model": 1, "parameters": {"weight": 1.0}},
                                                 {"model": 2, "parameters": {"weight": 0.3}}]},
    "multislerp": {"models": [{"model": 1, "parameters": {"weight": 1.0}},
                              {"model": 2, "parameters": {"weight": 2.0}}]},
    "multislerp-tv": {"base_model": 0, "models": [{"model": 1, "parameters": {"weight": 1.0}},
                                                 {"model": 2, "parameters": {"weight": 2.0}}],
                      "parameters": {"normalize_weights": False}},
    "dare_linear": {"base_model": 0, "models": [{"model": 1, "parameters": {"weight": 1.0, "density": 0.5}},
                                                {"model": 2, "parameters": {"weight": 1.0, "density": 0.5}}]},
    "della_linear": {"base_model": 0, "models": [
        {"model": 1, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
        {"model": 2, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}]},
}
RANDOM = {"dare_linear", "della_linear"}


def _fill(c, paths):
    def m(v):
        return paths[v] if isinstance(v, int) else v

    c = dict(c)
    if "base_model" in c:
        c["base_model"] = m(c["base_model"])
    c["models"] = [{**e, "model": m(e["model"])} for e in c["models"]]
    return c


# Measured against mergekit 0.1.5 (tiny Llama, bf16 inputs, dtype float32): these do not agree within one bf16
# step on >= 99.99 % of elements, and why (docs/merge.md, "Agreement with mergekit").
KNOWN = {
    "ties": "99.917 %: exact-k trim, ties at the k-th magnitude taken in torch's unstable argsort order "
            "(test_ties_differs_only_at_threshold_ties)",
    "breadcrumbs_ties": "99.83 %: the same tie order at the top/bottom cuts",
    "sce": "99.88 %: exactly k kept by variance, ties at the k-th variance taken in torch.topk's order, and the "
           "tau^2 weights follow the kept set (test_sce_differs_only_at_threshold_ties)",
}


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xfail(reason=KNOWN[m], strict=False))
                                    if m in KNOWN else m for m in sorted(CONFIGS)])
@pytest.mark.skipif(not os.path.exists(MK), reason=f"mergekit not installed ({MK}); see tools/bench_merge.py")
def test_agrees_with_mergekit(tmp_path, method):
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file  # noqa: F401  (bf16 refused: read through ptm's store)

    from ptm.ckpt import stores

    paths = _models(tmp_path)
    cfg = {"merge_method": method.split("-")[0], "dtype": "float32", "out_dtype": "bfloat16",
           **_fill(CONFIGS[method], paths)}
    a, b = _merge_both(tmp_path, cfg)
    base = stores.open_store(paths[0])
    agree = total = 0
    pooled: list = []
    for n in b.tensors():
        x = a.read(n, ()).astype(np.float32)
        y = b.read(n, ()).astype(np.float32)
        if method in RANDOM:  # in distribution: fraction changed from the base and mean |delta|
            z = base.read(n, ()).astype(np.float32)
            _same_distribution(n, x - z, y - z)
            pooled.append((x - z, y - z))
            continue
        step = np.abs(x) * 2.0 ** -7 + 1e-30  # one bf16 step
        agree += int((np.abs(x - y) <= step).sum())
        total += x.size
    if method not in RANDOM:
        print(f"{method}: {100 * agree / total:.4f} % of {total} elements within one bf16 step")  # pytest -s
        assert agree / total >= 0.9999, f"{method}: {agree / total:.6f} of elements within one bf16 step"
    else:  # the whole model: ~120k elements make the bounds tight
        _same_distribution("all", *(np.concatenate([p[i].ravel() for p in pooled]) for i in (0, 1)))


def _deep(path, seed: int, tok_dir: str) -> str:
    """A 3-layer tiny Llama (float32) with the tokenizer files of `tok_dir`."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for f in os.listdir(tok_dir):
        if f.startswith(("tokenizer", "special")):
            shutil.copy(f"{tok_dir}/{f}", path)
    return str(path)


def _vocab_and_deep_models(tmp_path) -> tuple[str, ...]:
    """Tiny HF models for the vocabulary cases (base; chat with two added tokens; perm with permuted ids, one added
    token and a padded embedding) and three 3-layer ones for slices: (base, chat, perm, d0, d1, d2)."""
    pytest.importorskip("transformers")
    from tests.merge.test_vocab import WORDS, _hf

    base = _hf(tmp_path / "base", 0, WORDS)
    chat = _hf(tmp_path / "chat", 1, WORDS, ["<|im_start|>", "<|im_end|>"])
    perm = _hf(tmp_path / "perm", 2, WORDS[::-1], ["<|im_start|>"], rows=40)
    return (base, chat, perm, *(_deep(tmp_path / f"d{i}", i, base) for i in range(3)))


def _src(model: str, a: int, b: int, params: dict | None = None) -> dict:
    """One slice source: `model` layers [a, b), with `params` when given."""
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


@pytest.mark.skipif(not os.path.exists(MK), reason=f"mergekit not installed ({MK}); see tools/bench_merge.py")
def test_slices_and_tokenizers_agree_with_mergekit(tmp_path):
    """Frankenmerges (passthrough; task arithmetic over aligned slices) and vocabulary surgery (union, base):
    the same tensors, shapes and output vocabulary as mergekit 0.1.5, within 1e-6 (float32)."""
    base, chat, perm, d0, d1, d2 = _vocab_and_deep_models(tmp_path)

    def src(m, a, b, w=None):
        return _src(m, a, b, {"weight": w} if w is not None else None)

    cfgs = {
        "passthrough": {"merge_method": "passthrough", "slices": [{"sources": [src(d0, 0, 2)]},
                                                                  {"sources": [src(d1, 1, 3)]}]},
        "aligned": {"merge_method": "task_arithmetic", "base_model": d0, "slices": [
            {"sources": [src(d0, 0, 2), src(d1, 0, 2, 0.5), src(d2, 0, 2, 0.3)]},
            {"sources": [src(d0, 1, 3), src(d1, 1, 3, 0.5), src(d2, 1, 3, 0.3)]}]},
        **{f"tokenizer_{s}": {"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": s,
                              "models": [{"model": chat, "parameters": {"weight": 0.5}},
                                         {"model": perm, "parameters": {"weight": 0.25}}]} for s in ("union", "base")},
    }
    _agree_within_1e6(tmp_path, cfgs, vocab=("tokenizer",))


@pytest.mark.skipif(not os.path.exists(MK), reason=f"mergekit not installed ({MK}); see tools/bench_merge.py")
def test_token_sources_padding_and_slice_parameters_agree_with_mergekit(tmp_path):
    """mergekit's `tokenizer:` block (tokens from a model, zero, model_token, force, added tokens;
    pad_to_multiple_of, whose padding rows mergekit fills per input before merging: slerp shows it) and per-slice
    parameters (source- and slice-level, gradients within slices): the same tensors and vocabulary as mergekit
    0.1.5, within 1e-6 (float32)."""
    base, chat, perm, d0, d1, d2 = _vocab_and_deep_models(tmp_path)

    src = _src

    tokens = {"<|im_start|>": {"source": chat}, "w6": {"source": perm, "force": True},
              "<|im_end|>": {"source": {"kind": "zero"}},
              "w9": {"source": {"kind": "model_token", "model": chat, "token": "w8"}, "force": True},
              "<zz>": {"source": {"kind": "model_token", "model": base, "token": "w1"}},
              "<aa>": {"source": {"kind": "model_token", "model": perm, "token_id": 3}}}
    cfgs = {
        "tokens_pad": {"merge_method": "task_arithmetic", "base_model": base,
                       "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 16},
                       "models": [{"model": chat, "parameters": {"weight": 0.5}},
                                  {"model": perm, "parameters": {"weight": 0.25}}]},
        "slerp_pad": {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.3},
                      "tokenizer": {"source": "base", "pad_to_multiple_of": 5,
                                    "tokens": {"w3": {"source": chat, "force": True}}},
                      "models": [{"model": base}, {"model": chat}]},
        "slice_parameters": {"merge_method": "task_arithmetic", "base_model": d0, "parameters": {"weight": 0.1},
                             "slices": [
            {"sources": [src(d0, 0, 3), src(d1, 0, 3, {"weight": [0.0, 1.0]}), src(d2, 0, 3)],
             "parameters": {"weight": 0.7}},
            {"sources": [src(d0, 1, 3), src(d1, 1, 3, {"weight": 0.5}), src(d2, 1, 3, {"weight": [1.0, 0.2]})]}]},
        "slerp_slice_t": {"merge_method": "slerp", "base_model": d0, "parameters": {"t": 0.9}, "slices": [
            {"sources": [src(d0, 0, 2), src(d1, 0, 2)], "parameters": {"t": [0.1, 0.6]}},
            {"sources": [src(d0, 1, 3), src(d1, 1, 3)], "parameters": {"t": 0.3}}]},
    }
    _agree_within_1e6(tmp_path, cfgs, vocab=("tokens", "slerp_pad"))

def _merge_both(tmp_path, cfg: dict, name: str = "") -> tuple:
    """Write `cfg` as `name`.yml, merge it with mergekit 0.1.5 (mk_`name`) and ptm (ptm_`name`); the two stores."""
    from ptm.ckpt import stores

    p = tmp_path / f"{name or 'cfg'}.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    mk, pt = tmp_path / f"mk{'_' + name if name else ''}", tmp_path / f"ptm{'_' + name if name else ''}"
    res = subprocess.run([MK, str(p), str(mk), "--allow-crimes"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    engine.merge(mergekit_yaml.load(str(p), out=str(pt)), progress=False, summary=False)
    return stores.open_store(str(mk)), stores.open_store(str(pt))


def _agree_within_1e6(tmp_path, cfgs: dict, vocab: tuple[str, ...]) -> None:
    """Run each float32 config through mergekit 0.1.5 and ptm: the same tensors and shapes within 1e-6, and for
    the configs whose name starts with one of `vocab`, the same output vocabulary."""
    from tests.merge.test_vocab import _vocab

    for name, cfg in cfgs.items():
        a, b = _merge_both(tmp_path, {"dtype": "float32", **cfg}, name)
        assert set(a.tensors()) == set(b.tensors()), name
        for n in a.tensors():
            x, y = a.read(n, ()).astype(np.float32), b.read(n, ()).astype(np.float32)
            assert x.shape == y.shape and np.abs(x - y).max() <= 1e-6, (name, n)
        if name.startswith(vocab):
            assert _vocab(tmp_path / f"mk_{name}") == _vocab(tmp_path / f"ptm_{name}")


def _same_distribution(name, dx: np.ndarray, dy: np.ndarray) -> None:
    """Random drops (DARE, DELLA) agree in distribution: the fraction of entries changed from the base and the
    mean |change| agree within 5 standard errors of their sampling noise. Two mergekit runs on the 64-element
    norm tensors differ by as much as ptm and mergekit do (measured: 0.699 vs 0.659 changed; ptm 0.665), so a
    fixed tolerance there only measured the noise."""
    n = dx.size
    fx, fy = np.mean(dx != 0), np.mean(dy != 0)
    f = (fx + fy) / 2
    assert abs(fx - fy) <= 5 * np.sqrt(2 * f * (1 - f) / n) + 1e-3, (name, fx, fy)
    ax, ay = np.abs(dx), np.abs(dy)
    se = np.sqrt((ax.var() + ay.var()) / n)
    assert abs(ax.mean() - ay.mean()) <= 5 * se + 1e-6, (name, ax.mean(), ay.mean())


@pytest.mark.skipif(not os.path.exists(MK), reason=f"mergekit not installed ({MK}); see tools/bench_merge.py")
def test_ties_differs_only_at_threshold_ties(tmp_path):
    """Every element where ptm's mergekit-convention TIES and mergekit's differ is one whose task value ties
    with its model's k-th largest magnitude: both keep exactly k, and only the choice among equal magnitudes
    (bf16 inputs make many) differs. mergekit takes them in torch's unstable argsort order (observed: not index
    order on large arrays), which cannot be reproduced without torch's sort itself."""
    pytest.importorskip("transformers")
    from ptm.ckpt import stores

    paths = _models(tmp_path)
    cfg = {"merge_method": "ties", "dtype": "float32", "out_dtype": "bfloat16", **_fill(CONFIGS["ties"], paths)}
    a, b = _merge_both(tmp_path, cfg)
    models = [stores.open_store(p) for p in paths]
    densities = [e["parameters"]["density"] for e in CONFIGS["ties"]["models"]]
    off = 0
    for n in b.tensors():
        z, *sk = (np.asarray(m.read(n, ()), np.float32).ravel() for m in models)
        x, y = (np.asarray(s.read(n, ()), np.float32).ravel() for s in (a, b))
        bad = np.abs(x - y) > np.abs(x) * 2.0**-7 + 1e-30
        at_tie = np.zeros(bad.sum(), bool)
        for s_, d in zip(sk, densities, strict=True):
            tau = np.abs(s_ - z)
            kth = np.sort(tau)[::-1][int(d * tau.size) - 1]
            at_tie |= tau[bad] == kth
        assert at_tie.all(), (n, int((~at_tie).sum()))
        off += int(bad.sum())
    assert off > 0  # the case this test is about still exists (else KNOWN["ties"] is stale)


@pytest.mark.skipif(not os.path.exists(MK), reason=f"mergekit not installed ({MK}); see tools/bench_merge.py")
def test_sce_differs_only_at_threshold_ties(tmp_path):
    """SCE with select_topk < 1 (convention mergekit): per tensor both tools keep exactly k = int(topk * #positions
    with variance > 0) positions, and the kept sets differ only at positions whose variance ties with the k-th
    largest; given mergekit's kept set, ptm's Calculate (tau^2 weights over the kept positions) and Erase
    (unweighted sign vote, weighted mean) reproduce mergekit's output. mergekit takes tied positions in
    torch.topk's order; the weights depend on the kept set, so a tie choice moves the whole tensor slightly."""
    pytest.importorskip("transformers")
    from ptm.ckpt import stores
    from ptm.merge.methods import Context, sparse

    paths = _models(tmp_path)
    topk = CONFIGS["sce"]["parameters"]["select_topk"]
    cfg = {"merge_method": "sce", "dtype": "float32", "out_dtype": "float32", **_fill(CONFIGS["sce"], paths)}
    a, b = _merge_both(tmp_path, cfg)
    models = [stores.open_store(p) for p in paths]
    tie_diffs = 0
    for n in b.tensors():
        z, *sk = (np.asarray(m.read(n, ()), np.float32).ravel() for m in models)
        x, y = (np.asarray(s.read(n, ()), np.float32).ravel() for s in (a, b))
        taus = [s_ - z for s_ in sk]
        var = sparse._sce_var(taus)
        k = int(topk * np.count_nonzero(var))
        kth = np.sort(var)[::-1][k - 1]
        kx, ky = x != z, y != z  # float32 outputs: a kept position always changes (its agreeing entries are != 0)
        assert kx.sum() == k and ky.sum() == k, (n, int(kx.sum()), int(ky.sum()), k)
        assert (var[kx != ky] == kth).all(), n
        tie_diffs += int((kx != ky).sum())
        xm = {"pre": z, "skills": [z + np.where(kx, t, np.float32(0)) for t in taus]}  # mergekit's selection
        idx = np.arange(z.size, dtype=np.uint64)
        st = sparse.sce_stats(lambda xm=xm, idx=idx: iter([(xm, lambda: idx)]), z.size)
        want = sparse.sce(xm, [1.0] * len(taus), Context(unit=st))  # select_topk = 1: Calculate + Erase only
        assert np.abs(want - x).max() <= 1e-6, (n, float(np.abs(want - x).max()))
    assert tie_diffs > 0  # the case this test is about still exists (else KNOWN["sce"] is stale)
