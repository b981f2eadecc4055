"""mergekit's `tokenizer:` block beyond `source`: per-token row sources (`tokens`: a model, `kind: zero`,
`kind: model_token`, `force`) and `pad_to_multiple_of`, row by row on tiny models; bad specs are ConfigErrors
naming the key, token or model, before anything is written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ptm.ckpt import stores
from ptm.errors import ConfigError, MergeError
from ptm.merge import engine, mergekit_yaml, vocab
from ptm.merge.recipe import Recipe, from_dict
from tests.merge.conftest import f32
from tests.merge.test_vocab import WORDS, _hf, _ptm_ckpt, _rule, _vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request, tmp_path_factory):
    tied = request.param
    d = tmp_path_factory.mktemp("vocab_tokens")
    return {"base": _hf(d / "base", 0, WORDS, tied=tied),  # 32 tokens
            "chat": _hf(d / "chat", 1, WORDS, ["<|im_start|>", "<|im_end|>"], tied=tied),  # 34
            "perm": _hf(d / "perm", 2, WORDS[::-1], ["<|im_start|>"], rows=40, tied=tied),  # permuted, 40 rows
            "tied": tied}


def _tokens(m):
    return {
        "<|im_start|>": {"source": m["chat"]},  # base lacks it: chat's row; chat and perm keep their own
        "w5": {"source": m["chat"]},  # everyone has it: no effect without force
        "w6": {"source": m["perm"], "force": True},  # every model takes perm's w6
        "<|im_end|>": {"source": {"kind": "zero"}},  # base and perm lack it: zeros; chat keeps its own
        "w9": {"source": {"kind": "model_token", "model": m["chat"], "token": "w8"}, "force": True},
        "<zz>": {"source": {"kind": "model_token", "model": m["base"], "token": "w1"}},  # added: id 34
        "<aa>": {"source": {"kind": "zero"}, "force": True},  # added: id 35 (the order listed)
        "<new3>": {"source": {"kind": "model_token", "model": m["perm"], "token_id": 3}},  # perm's id 3: w26
    }


def _want_row(tok, k, src, voc, m):
    """Model k's row for `tok` under _tokens(m): the override where it applies, else vocab's default rule."""
    c = _tokens(m).get(tok)
    if c is not None and (c.get("force") or tok not in voc[k]):
        s = c["source"]
        if isinstance(s, str):
            j = next(n for n in src if m[n] == s)
            return src[j][voc[j][tok]]
        if s["kind"] == "zero":
            return np.zeros_like(src[k][0])
        j = next(n for n in src if m[n] == s["model"])
        return src[j][s["token_id"] if "token_id" in s else voc[j][s["token"]]]
    return _rule(tok, k, src, voc)


def _merge(m, tmp_path, tokenizer, name="out"):
    out = str(tmp_path / name)
    engine.merge(Recipe("task_arithmetic", {"pre": m["base"], "skills": [m["chat"], m["perm"]]}, weights=[0.5, 0.25],
                        out=out, tokenizer=tokenizer, output_format="safetensors"), progress=False, summary=False)
    return out


@pytest.mark.parametrize("pad", [None, 16])
def test_token_sources_row_by_row_and_padding(models, tmp_path, pad):
    spec = {"source": "union", "tokens": _tokens(models), **({"pad_to_multiple_of": pad} if pad else {})}
    out = _merge(models, tmp_path, spec)
    ov = _vocab(out)
    n = len(WORDS) + 2 + 2 + 3  # base's, the union's two, three listed tokens added in the order listed
    assert len(ov) == n and [ov[t] for t in ("<zz>", "<aa>", "<new3>")] == [n - 3, n - 2, n - 1]
    rows = pad * -(-n // pad) if pad else n
    st = stores.open_store(out)
    names = ["model.embed_tokens.weight"] + ([] if models["tied"] else ["lm_head.weight"])
    for name in names:
        got = f32(st.read(name, ()))
        assert got.shape[0] == rows
        src = {k: f32(stores.open_store(models[k]).read(name, ())) for k in ("base", "chat", "perm")}
        voc = {k: _vocab(models[k]) for k in src}
        per_model = {k: np.stack([_want_row(t, k, src, voc, models) for t in sorted(ov, key=ov.get)]) for k in src}
        if pad:  # each model's padding rows: the mean of its own output rows, then merged like any row
            per_model = {k: np.concatenate([r, np.tile(r.mean(0), (rows - n, 1))]) for k, r in per_model.items()}
        pre = per_model["base"]
        want = pre + np.float32(0.5) * (per_model["chat"] - pre) + np.float32(0.25) * (per_model["perm"] - pre)
        for i in range(rows):
            np.testing.assert_allclose(got[i], want[i], atol=1e-6, err_msg=f"{name} row {i}")
        np.testing.assert_array_equal(got[ov["<aa>"]], 0)  # forced zero in every model
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["vocab_size"] == rows
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == n and tok.convert_tokens_to_ids("<zz>") == ov["<zz>"]
    ids = tok("w3 <zz> w7", add_special_tokens=False)["input_ids"]
    assert ids == [ov["w3"], ov["<zz>"], ov["w7"]]
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape[-1] == rows


def test_padding_keeps_the_tokenizer_and_the_other_rows(models, tmp_path):
    plain = _merge(models, tmp_path, "base", "plain")
    padded = _merge(models, tmp_path, {"source": "base", "pad_to_multiple_of": 5}, "padded")
    assert open(f"{plain}/tokenizer.json").read() == open(f"{padded}/tokenizer.json").read()
    a, b = stores.open_store(plain), stores.open_store(padded)
    for name in a.tensors():
        x, y = a.read(name, ()), b.read(name, ())
        if name in vocab.VOCAB_AXIS:  # 32 tokens -> 35 rows; the first 32 are unchanged (a linear method)
            assert y.shape == (35, *x.shape[1:])
            np.testing.assert_array_equal(y[:32], x)
        else:
            np.testing.assert_array_equal(x, y)


def test_orbax_ptm_names_padded_and_overridden(tmp_path):
    """ptm names (lm_head.kernel [E, V]: vocabulary on axis 1), an Orbax output: padded rows, a forced row,
    metadata vocab_size = the padded rows and the unchanged tokenizer recorded."""
    from ptm.ckpt import format as ckpt_format
    from tests.merge.conftest import restore

    hb, hc = _hf(tmp_path / "hb", 0, WORDS), _hf(tmp_path / "hc", 1, WORDS[::-1], ["<|im_start|>"])
    b, c = _ptm_ckpt(tmp_path / "b", 0, f"{hb}/tokenizer.json"), _ptm_ckpt(tmp_path / "c", 1, f"{hc}/tokenizer.json")
    vb, vc = _vocab(hb), _vocab(hc)
    spec = {"source": "base", "pad_to_multiple_of": 12, "tokens": {"w2": {"source": c, "force": True}}}
    out = str(tmp_path / "o")
    engine.merge(Recipe("linear", {"models": [b, c]}, weights=[0.5, 0.5], out=out, tokenizer=spec),
                 progress=False, summary=False)
    got, meta, tb, tc = restore(out), ckpt_format.read_meta(out), restore(b), restore(c)
    assert got["lm_head.kernel"].shape == (16, 36) and got["embed.embedding"].shape == (36, 16)
    assert meta["model"]["vocab_size"] == 36 and meta["tokenizer"] == f"{hb}/tokenizer.json"
    for key, ax in (("lm_head.kernel", 1), ("embed.embedding", 0)):
        kb, kc = np.moveaxis(tb[key], ax, 0), np.moveaxis(tc[key], ax, 0)
        rb = np.stack([kc[vc[t]] if t == "w2" else kb[vb[t]] for t in sorted(vb, key=vb.get)])
        rc = np.stack([kc[vc[t]] for t in sorted(vb, key=vb.get)])
        want = np.float32(0.5) * np.concatenate([rb, np.tile(rb.mean(0), (4, 1))]) + np.float32(0.5) * np.concatenate(
            [rc, np.tile(rc.mean(0), (4, 1))])
        np.testing.assert_allclose(np.moveaxis(got[key], ax, 0), want, atol=1e-6, err_msg=key)
    added = {"source": "base", "tokens": {"<x>": {"source": {"kind": "zero"}}}}
    with pytest.raises(MergeError, match="safetensors"):  # a new tokenizer needs an HF output
        engine.merge(Recipe("linear", {"models": [b, c]}, out=str(tmp_path / "x"), tokenizer=added),
                     progress=False, summary=False)
    assert not (tmp_path / "x").exists()


def test_bad_specs_are_config_errors_naming_the_culprit(models, tmp_path):
    m = models
    paths = [m["base"], m["chat"], m["perm"]]
    for spec, msg in [
        ({"source": "union", "pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"source": "union", "pad_to_multiple_of": -8}, "pad_to_multiple_of"),
        ({"source": "union", "pad_to_multiple_of": True}, "pad_to_multiple_of"),
        ({"source": "union", "pad_to_multiple_of": "8"}, "pad_to_multiple_of"),
        ({"source": "union", "embed_slerp": True}, "embed_slerp"),
        ({"source": "union", "tokens": {"<x>": {}}}, r"tokens\['<x>'\]: needs a source"),
        ({"source": "union", "tokens": {"<x>": {"source": "/no/model"}}}, "'/no/model' is not one of the inputs"),
        ({"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "/no/model",
                                                           "token": "w1"}}}}, "/no/model"),
        ({"source": "union", "tokens": {"<x>": {"source": {"kind": "mean"}}}}, r"<x>.*kind: zero"),
        ({"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}, "force": "yes"}}}, "force"),
        ({"source": "/no/model"}, "/no/model"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            vocab.parse_spec(spec, paths)
        with pytest.raises(ConfigError, match=msg):  # a ptm recipe refuses it when read
            from_dict({"method": "linear", "inputs": {"models": paths}, "tokenizer": spec})
    # needs the tokenizers: refused at plan time, before anything is written
    for tokens, msg in [
        ({"<|im_end|>": {"source": m["perm"]}}, r"<\|im_end\|>.*not in the tokenizer of .*perm"),
        ({"<x>": {"source": {"kind": "model_token", "model": m["base"], "token": "<nope>"}}}, "'<nope>' is not in"),
        ({"<x>": {"source": {"kind": "model_token", "model": m["base"], "token_id": 32}}}, "token_id 32 is past"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            _merge(m, tmp_path, {"source": "union", "tokens": tokens}, "never")
        assert not (tmp_path / "never").exists()


def test_mergekit_yaml_tokenizer_block(models, tmp_path):
    m = models
    base = {"merge_method": "task_arithmetic", "base_model": m["base"],
            "models": [{"model": m["chat"], "parameters": {"weight": 0.5}},
                       {"model": m["perm"], "parameters": {"weight": 0.25}}]}
    (r,) = mergekit_yaml.translate({**base, "tokenizer": {"pad_to_multiple_of": 8}})  # source: union by default
    assert r.tokenizer == {"source": "union", "pad_to_multiple_of": 8} and r.output_format == "safetensors"
    (r,) = mergekit_yaml.translate({**base, "tokenizer": {"source": "base", "pad_to_multiple_of": 8}})
    assert r.tokenizer == {"source": "base", "pad_to_multiple_of": 8} and r.output_format is None
    (r,) = mergekit_yaml.translate({**base, "tokenizer": {"source": "base"}})
    assert r.tokenizer == "base"
    (r,) = mergekit_yaml.translate({**base, "tokenizer": {"source": "union", "tokens": _tokens(m)}}, out=str(
        tmp_path / "y"))
    assert r.tokenizer["tokens"] == _tokens(m)
    engine.merge(r, progress=False, summary=False)
    a = stores.open_store(str(tmp_path / "y")).read("model.embed_tokens.weight", ())
    b = stores.open_store(_merge(m, tmp_path, {"source": "union", "tokens": _tokens(m)})).read(
        "model.embed_tokens.weight", ())
    np.testing.assert_array_equal(a, b)
    for cfg, msg in [
        ({**base, "tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
        ({**base, "tokenizer": {"tokens": {"<x>": {"source": "other"}}}}, "'other' is not one of the inputs"),
        ({**base, "tokenizer": {"source": "union", "embed_slerp": True}}, "embed_slerp"),
        ({**base, "embed_slerp": True}, "embed_slerp"),
        ({**base, "tokenizer": {"source": "union"}, "tokenizer_source": "union"}, "not both"),
        ({**base, "tokenizer": "union"}, "mapping"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            mergekit_yaml.translate(cfg, out=str(tmp_path / "z"))
    assert not (tmp_path / "z").exists()


def test_example_config_parses():
    root = os.path.join(os.path.dirname(__file__), "../../configs/merges")
    (r,) = mergekit_yaml.load(f"{root}/mergekit_chatml_tokens_padded.yml", out="o")
    assert r.tokenizer["pad_to_multiple_of"] == 64 and r.tokenizer["tokens"]["<|pad|>"]["force"] is True
    assert r.output_format == "safetensors" and r.weights[1]["layers"] == [0.3] * 11 + [0.6] * 11
    assert r.overrides == [{"pattern": "re:embed", "weights": [1.0, 0.3]}]


def test_padded_bf16_output_loads_in_transformers(tmp_path):
    """A bf16, sharded, padded output (40 tokens -> 64 rows): transformers loads it and its logits equal a direct
    load of the same tensors; each padding row is the bf16 rounding of the float32 mean of the model's rows."""
    from safetensors.torch import load_file

    from tests.merge.test_hf_output import _tiny

    base, other = _tiny(tmp_path / "base", 0), _tiny(tmp_path / "other", 1)
    out = str(tmp_path / "out")
    engine.merge(Recipe("linear", {"models": [base, other]}, weights=[1.0, 0.0], out=out, shard_bytes=20_000,
                        tokenizer={"source": "base", "pad_to_multiple_of": 64}), progress=False, summary=False)
    assert json.load(open(f"{out}/config.json"))["vocab_size"] == 64 and len(_vocab(out)) == 40
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    direct = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(out)).to(torch.bfloat16)
    shards = [f for f in sorted(os.listdir(out)) if f.startswith("model-")]
    sd = {k: v for f in shards for k, v in load_file(f"{out}/{f}").items()}
    direct.load_state_dict(sd, strict=False)
    ids = torch.tensor([[1, 5, 7, 39]])
    with torch.no_grad():
        a, b = model(ids).logits, direct(ids).logits
    assert a.shape[-1] == 64 and torch.equal(a, b)
    src = load_file(f"{base}/model.safetensors")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(sd[n][:40], src[n])
        want = src[n].float().mean(0).to(torch.bfloat16)
        assert torch.equal(sd[n][40:], want.expand(24, -1)), n
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False) == "w3 "


def test_cli_and_toml_recipes(models, tmp_path, capsys):
    """`ptm merge x.yml` with a bad tokenizer block exits non-zero naming the token, writing nothing; a ptm recipe
    takes the same mapping."""
    import yaml

    from ptm import cli

    m = models
    cfg = {"merge_method": "task_arithmetic", "base_model": m["base"],
           "models": [{"model": m["chat"], "parameters": {"weight": 0.5}}],
           "tokenizer": {"source": "base", "tokens": {"<|im_end|>": {"source": m["base"]}}}}
    p = tmp_path / "bad.yml"
    p.write_text(yaml.safe_dump(cfg))
    assert cli.main(["merge", str(p), "--out", str(tmp_path / "o")]) != 0
    assert "'<|im_end|>' is not in the tokenizer of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (r,) = from_dict({"method": "linear", "inputs": {"models": [m["base"], m["chat"]]}, "out": str(tmp_path / "t"),
                      "tokenizer": {"source": "base", "pad_to_multiple_of": 12}})
    engine.merge(r, progress=False, summary=False)
    assert stores.open_store(str(tmp_path / "t")).tensors()["model.embed_tokens.weight"].shape[0] == 36
