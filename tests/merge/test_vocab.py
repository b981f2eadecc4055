"""Vocabulary surgery (`tokenizer = "base" | "union" | <input>`): inputs whose vocabularies differ (added tokens,
permuted ids, a padded embedding) are merged row by token; the output tokenizer is written and transformers loads
the output model and tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptm.ckpt import stores
from ptm.errors import MergeError
from ptm.merge import engine, mergekit_yaml
from ptm.merge.recipe import Recipe
from tests.merge.conftest import f32

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = [f"w{i}" for i in range(30)]


def _hf(path, seed: int, words: list[str], added: list[str] = (), rows: int | None = None, tied: bool = False) -> str:
    """A tiny Llama with a WordLevel tokenizer over `words` (+ <s>, </s>, then `added` special tokens);
    `rows` > vocabulary pads the embedding."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)} | {"<s>": len(words), "</s>": len(words) + 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(a, special=True, normalized=False) for a in added])
    n = tk.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=rows or n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return str(path)


def _vocab(path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(f"{path}/tokenizer.json").get_vocab(with_added_tokens=True)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request, tmp_path_factory):
    tied = request.param
    d = tmp_path_factory.mktemp("vocab")
    base = _hf(d / "base", 0, WORDS, tied=tied)  # 32 tokens
    chat = _hf(d / "chat", 1, WORDS, ["<|im_start|>", "<|im_end|>"], tied=tied)  # 34 tokens
    perm = _hf(d / "perm", 2, WORDS[::-1], ["<|im_start|>"], rows=40, tied=tied)  # ids permuted, padded to 40 rows
    return {"base": base, "chat": chat, "perm": perm, "tied": tied}


def _merge(models, tmp_path, tokenizer, name="out"):
    out = str(tmp_path / name)
    r = Recipe("task_arithmetic", {"pre": models["base"], "skills": [models["chat"], models["perm"]]},
               weights=[0.5, 0.25], out=out, tokenizer=tokenizer, output_format="safetensors")
    engine.merge(r, progress=False, summary=False)
    return out


def _rule(tok: str, k: str, src: dict[str, np.ndarray], voc: dict[str, dict[str, int]]) -> np.ndarray:
    """Model k's row for `tok`: its own, else base's, else the only model's that has it, else their mean."""
    if tok in voc[k]:
        return src[k][voc[k][tok]]
    if tok in voc["base"]:
        return src["base"][voc["base"][tok]]
    have = [m for m in src if tok in voc[m]]
    return src[have[0]][voc[have[0]][tok]] if len(have) == 1 else np.mean([src[m][voc[m][tok]] for m in have], 0)


@pytest.mark.parametrize("spec", ["union", "base", "chat"])
def test_rows_token_by_token_and_transformers_loads(models, tmp_path, spec):
    tokenizer = models[spec] if spec == "chat" else spec
    out = _merge(models, tmp_path, tokenizer)
    ov = _vocab(out)
    want_tokens = {"union": len(WORDS) + 4, "base": len(WORDS) + 2, "chat": len(WORDS) + 4}[spec]
    assert len(ov) == want_tokens
    if spec == "union":  # base ids first, then the added tokens in input order
        assert ov["<|im_start|>"] == len(WORDS) + 2 and ov["<|im_end|>"] == len(WORDS) + 3
    st = stores.open_store(out)
    names = ["model.embed_tokens.weight"] + ([] if models["tied"] else ["lm_head.weight"])
    assert ("lm_head.weight" in st.tensors()) == (not models["tied"])
    for n in names:
        got = f32(st.read(n, ()))
        assert got.shape[0] == len(ov)
        src = {m: f32(stores.open_store(models[m]).read(n, ())) for m in ("base", "chat", "perm")}
        voc = {m: _vocab(models[m]) for m in src}
        for tok, i in ov.items():
            row = {k: _rule(tok, k, src, voc) for k in src}
            pre = row["base"]
            want = pre + np.float32(0.5) * (row["chat"] - pre) + np.float32(0.25) * (row["perm"] - pre)
            np.testing.assert_allclose(got[i], want, atol=1e-6, err_msg=f"{n} {tok}")
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["vocab_size"] == len(ov)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w3 w7", add_special_tokens=False)["input_ids"]
    assert ids == [ov["w3"], ov["w7"]]
    if spec != "base":
        assert tok.convert_tokens_to_ids("<|im_start|>") == ov["<|im_start|>"]
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits.shape[-1] == len(ov)


def test_rebuilt_vocabulary_rows_are_not_views(models, tmp_path):
    r = Recipe("task_arithmetic", {"pre": models["base"], "skills": [models["chat"], models["perm"]]},
               weights=[0.5, 0.25], out=str(tmp_path / "o"), tokenizer="union", output_format="safetensors")
    for st in engine.plan([r]).stores:
        assert not st.reads_are_views("model.embed_tokens.weight")  # built row by token in memory
        assert st.reads_are_views("model.layers.0.mlp.up_proj.weight")  # the input's mapped pages


def test_token_in_two_models_not_base_takes_the_mean(tmp_path):
    base = _hf(tmp_path / "b", 0, WORDS)
    a = _hf(tmp_path / "a", 1, WORDS, ["<x>"])
    c = _hf(tmp_path / "c", 2, WORDS, ["<x>"])
    out = str(tmp_path / "o")
    engine.merge(Recipe("linear", {"models": [base, a, c]}, weights=[1.0, 0.0, 0.0], out=out, tokenizer="union"),
                 progress=False, summary=False)
    ea, ec = (f32(stores.open_store(p).read("model.embed_tokens.weight", ())) for p in (a, c))
    got = f32(stores.open_store(out).read("model.embed_tokens.weight", ()))
    i = _vocab(out)["<x>"]  # base lacks <x>: its row is the mean of a's and c's
    np.testing.assert_allclose(got[i], (ea[_vocab(a)["<x>"]] + ec[_vocab(c)["<x>"]]) / 2, atol=1e-6)


def test_mergekit_yaml_union_and_errors(models, tmp_path):
    import yaml

    cfg = {"merge_method": "task_arithmetic", "base_model": models["base"], "tokenizer_source": "union",
           "models": [{"model": models["chat"], "parameters": {"weight": 0.5}},
                      {"model": models["perm"], "parameters": {"weight": 0.25}}]}
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    (r,) = mergekit_yaml.load(str(p), out=str(tmp_path / "mk"))
    assert r.tokenizer == "union" and r.output_format == "safetensors"
    engine.merge(r, progress=False, summary=False)
    a = stores.open_store(str(tmp_path / "mk")).read("model.embed_tokens.weight", ())
    b = stores.open_store(_merge(models, tmp_path, "union", "o2")).read("model.embed_tokens.weight", ())
    assert np.array_equal(a, b)
    with pytest.raises(MergeError, match="vocabularies differ"):
        engine.merge(Recipe("task_arithmetic", {"pre": models["base"], "skills": [models["chat"]]},
                            out=str(tmp_path / "x")), progress=False, summary=False)
    bad = Recipe("task_arithmetic", {"pre": models["base"], "skills": [models["chat"]]}, out=str(tmp_path / "x"),
                 tokenizer="union", output_format="orbax")
    with pytest.raises(MergeError, match="safetensors"):
        engine.merge(bad, progress=False, summary=False)
    with pytest.raises(Exception, match="tokenizer"):
        engine.merge(Recipe("task_arithmetic", {"pre": models["base"], "skills": [models["chat"]]},
                            out=str(tmp_path / "y"), tokenizer="nope"), progress=False, summary=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _ptm_ckpt(path, seed: int, tok_json: str) -> str:
    """A ptm Orbax checkpoint (untied: lm_head.kernel [E, V], vocabulary on axis 1) naming `tok_json`."""
    from ptm.ckpt import format as ckpt_format
    from tests.merge.conftest import random_tree, save_orbax

    n = len(_vocab(tok_json.rsplit("/", 1)[0]))
    t = random_tree(seed, dtype=np.float32, vocab=n)
    t["lm_head"] = {"kernel": np.random.default_rng(seed + 9).standard_normal((16, n)).astype(np.float32)}
    save_orbax(path, t)
    meta = ckpt_format.read_meta(path)
    ckpt_format.write_meta(path, {**meta, "model": {**meta["model"], "vocab_size": n, "num_layers": 3},
                                  "tokenizer": tok_json})
    return str(path)


def test_orbax_inputs_ptm_names(tmp_path):
    from ptm.ckpt import format as ckpt_format
    from ptm.data.tokenizers import load_tokenizer
    from tests.merge.conftest import restore

    hb, hc = _hf(tmp_path / "hb", 0, WORDS), _hf(tmp_path / "hc", 1, WORDS[::-1], ["<|im_start|>"])
    b = _ptm_ckpt(tmp_path / "b", 0, f"{hb}/tokenizer.json")
    c = _ptm_ckpt(tmp_path / "c", 1, f"{hc}/tokenizer.json")
    vb, vc = _vocab(hb), _vocab(hc)
    tb, tc = restore(b), restore(c)
    for spec, voc in (("base", vb), (c, vc)):
        out = str(tmp_path / f"o{len(voc)}")
        engine.merge(Recipe("linear", {"models": [b, c]}, weights=[0.5, 0.5], out=out, tokenizer=spec),
                     progress=False, summary=False)
        got, meta = restore(out), ckpt_format.read_meta(out)
        assert got["lm_head.kernel"].shape == (16, len(voc)) and got["embed.embedding"].shape == (len(voc), 16)
        assert meta["model"]["vocab_size"] == len(voc) and load_tokenizer(meta["tokenizer"]).vocab_size == len(voc)
        for tok, i in voc.items():
            rb = tb["lm_head.kernel"][:, vb[tok]] if tok in vb else tc["lm_head.kernel"][:, vc[tok]]
            rc = tc["lm_head.kernel"][:, vc[tok]]
            np.testing.assert_allclose(got["lm_head.kernel"][:, i], np.float32(0.5) * rb + np.float32(0.5) * rc,
                                       atol=1e-6, err_msg=tok)


def test_tokenizer_past_the_embedding_is_an_error(tmp_path):
    base = _hf(tmp_path / "b", 0, WORDS)
    short = _hf(tmp_path / "s", 1, WORDS, ["<a>", "<b>"], rows=33)  # 34 tokens, 33 rows
    with pytest.raises(MergeError, match=r"/s: tensor '(lm_head|model.embed_tokens).weight' has 33 rows .* id 33"):
        engine.merge(Recipe("linear", {"models": [base, short]}, weights=[0.5, 0.5], out=str(tmp_path / "o"),
                            tokenizer="union"), progress=False, summary=False)
    assert not (tmp_path / "o").exists()
