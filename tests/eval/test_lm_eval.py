"""The lm-evaluation-harness backend `ptm`: requests against ptm's decoder, the chat template, the shipped toy task
YAMLs offline, `ptm eval --lm-eval` (checkpoints and in-memory recipes), `ptm lm-eval`, and the optional-extra
import error. Everything offline: task data are local JSONL files."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ptm.data.chat import encode_chat, encode_prompt
from ptm.eval import decode

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "lm_eval"


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}


def test_import_without_lm_eval_is_a_clear_ptm_error_and_core_never_imports_it():
    """lm-eval absent (blocked in sys.modules): the adapter names the extra; ptm's CLI and harness still load."""
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import ptm.cli, ptm.eval.harness, ptm.eval.commands, ptm.eval.scorers, ptm.eval.code_exec\n"
        "ptm.cli.build_parser()\n"
        "assert 'lm_eval' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "from ptm.errors import PtmError\n"
        "try:\n    import ptm.eval.lm_eval_model\nexcept PtmError as e:\n    print('PTMERROR', e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "PTMERROR" in p.stdout and "ptm[lm_eval]" in p.stdout, p.stdout


lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'ptm[lm_eval]')")
from lm_eval.api.instance import Instance  # noqa: E402

from ptm.eval import lm_eval_model as L  # noqa: E402


def _inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


@pytest.fixture(scope="module")
def lm(tiny_params, tiny_config, tok):
    return L.PtmLM.from_params(tiny_params, tiny_config, tok, batch_size=8, max_gen_toks=12)


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("ptm") is L.PtmLM


def test_loglikelihood_follows_lm_eval_tokenisation_and_matches_decode(lm, tiny_params, tiny_config, tok):
    reqs = [("Question: 2+2=", " 4"), ("Question: 2+2= ", "5"), ("", "hello world"), ("ab", "c" * 300)]
    got = lm.loglikelihood([_inst("loglikelihood", r, i) for i, r in enumerate(reqs)])
    bos = tok.bos_id
    pairs = [
        ([bos] + tok.encode("Question: 2+2="), tok.encode(" 4")),
        ([bos] + tok.encode("Question: 2+2="), tok.encode(" 5")),  # trailing space moves to the continuation
        ([bos], tok.encode("hello world")),  # empty context: the prefix token (BOS)
    ]
    ref = decode.loglikelihoods(tiny_params, tiny_config, tok, pairs, batch_size=8)
    for (ll, greedy), (rll, _, rg) in zip(got[:3], ref, strict=True):
        assert math.isclose(ll, rll, rel_tol=1e-5, abs_tol=1e-5) and greedy == rg
    # Too long: the last max_length + 1 tokens (here the continuation's tail) are kept, as lm-eval's hf does.
    tail_ids = ([bos] + tok.encode("ab") + tok.encode("c" * 300))[-(tiny_config.max_seq_len + 1):]
    (tail,) = decode.loglikelihoods(tiny_params, tiny_config, tok, [(tail_ids[:1], tail_ids[1:])], batch_size=8)
    assert math.isclose(got[3][0], tail[0], rel_tol=1e-5)


def test_loglikelihood_rolling_scores_every_token_once(lm, tiny_params, tiny_config, tok, monkeypatch):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (whole,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))])
    (ref,) = decode.loglikelihoods(tiny_params, tiny_config, tok, [([tok.bos_id], tok.encode(text))])
    assert math.isclose(whole, ref[0], rel_tol=1e-5)
    seen = []
    real = decode.loglikelihoods

    def spy(*a, **k):
        out = real(*a, **k)
        seen.extend(out)
        return out

    monkeypatch.setattr(decode, "loglikelihoods", spy)
    small = L.PtmLM.from_params(tiny_params, tiny_config, tok, batch_size=8, max_length=32)
    (windowed,) = small.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))])
    assert len(seen) == math.ceil(len(tok.encode(text)) / 32) and sum(n for _, n, _ in seen) == len(tok.encode(text))
    assert windowed < 0 and math.isfinite(windowed) and windowed != pytest.approx(whole, rel=1e-6)


def test_generate_until_matches_decode_with_stops_and_lengths(lm, tiny_params, tiny_config, tok):
    ctxs = ["Once upon a time", "Q: name a colour\nA:", "x"]
    kw = [{"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
          {"until": ["e", "a"], "max_gen_toks": 8},
          {"max_gen_toks": 8, "temperature": 0.0}]
    got = lm.generate_until([_inst("generate_until", (c, k), i) for i, (c, k) in enumerate(zip(ctxs, kw, strict=True))])
    ref = decode.generate(tiny_params, tiny_config, tok, [[tok.bos_id] + tok.encode(c) for c in ctxs],
                          decode.GenerationConfig(max_new_tokens=8), stops=[tuple(k.get("until", ())) for k in kw],
                          batch_size=8)
    for k, g, r in zip(kw, got, ref, strict=True):
        assert g == r.text and len(r.tokens) <= k["max_gen_toks"]
        assert all(s not in g for s in k.get("until", ()))


def test_sampled_repeats_differ_and_do_not_depend_on_batching(tiny_params, tiny_config, tok):
    req = ("Tell me", {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "top_p": 0.95})
    reqs = [_inst("generate_until", req, 0) for _ in range(4)] + [_inst("generate_until", ("Other", req[1]), 1)]
    a = L.PtmLM.from_params(tiny_params, tiny_config, tok, batch_size=8, seed=3).generate_until(reqs)
    b = L.PtmLM.from_params(tiny_params, tiny_config, tok, batch_size=8, seed=3).generate_until(reqs[::-1])[::-1]
    # Identical requests are interchangeable: the same set of samples, whatever the order; others unchanged.
    assert sorted(a[:4]) == sorted(b[:4]) and a[4] == b[4] and len(set(a[:4])) > 1
    with pytest.raises(L.ConfigError, match="top_k"):
        L.PtmLM.from_params(tiny_params, tiny_config, tok).generate_until(
            [_inst("generate_until", ("x", {"top_k": 5}))])


def test_chat_template_is_ptm_tulu_template_token_for_token(lm, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert lm.tok_encode(lm.apply_chat_template(msgs)) == encode_prompt(msgs, tok)
    shots = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "3+3?"}]
    ids, _ = encode_chat(shots + [{"role": "assistant", "content": "6"}], tok)
    prompt = lm.tok_encode(lm.apply_chat_template(shots))
    assert prompt == encode_prompt(shots, tok) and list(ids[: len(prompt)]) == prompt
    assert lm.apply_chat_template(shots).count(L.CHAT_EOS) == 1


# -------------------------------------------------------------------------------------- shipped toy YAMLs


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from ptm.toy.suite import generate_suite

    d = tmp_path_factory.mktemp("toy") / "suite"
    generate_suite(d, seed=0, sizes={"pretrain": 50, "general": 50, "science": 10, "safety": 10, "coding": 10,
                                     "eval": 6})
    return d


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def test_stage_task_dirs_fills_placeholders(tmp_path):
    root, (staged,) = L.stage_task_dirs([CONFIGS], data=str(tmp_path))
    try:
        text = (Path(staged) / "toy" / "ptm_toy_copy.yaml").read_text()
        assert f"{tmp_path}/eval/test/copy.jsonl" in text and "${" not in text
        assert (Path(staged) / "toy" / "utils.py").exists()
    finally:
        shutil.rmtree(root)
    root, (staged,) = L.stage_task_dirs([CONFIGS], env={})
    try:
        assert "/__unset__/PTM_LM_EVAL_DATA" in (Path(staged) / "toy" / "ptm_toy_copy.yaml").read_text()
    finally:
        shutil.rmtree(root)


def test_toy_tasks_through_lm_eval_match_native_generation(lm, toy_dir, tiny_params, tiny_config, tok):
    """The shipped YAMLs load offline; with the chat template, generations equal ptm's native harness outputs."""
    from ptm.eval.evalset import load_suite
    from ptm.eval.harness import evaluate

    res = L.simple_evaluate(lm, ["ptm_toy_copy", "ptm_toy_world_qa_mc"],
                            include=[str(CONFIGS)], data=str(toy_dir), apply_chat_template=True, limit=4,
                            log_samples=True)
    m = L.headline(res)
    assert set(m) == {"ptm_toy_copy", "ptm_toy_world_qa_mc"} and 0 <= m["ptm_toy_world_qa_mc"]["acc"] <= 1
    lm_out = [s["resps"][0][0] for s in res["samples"]["ptm_toy_copy"]]
    items = load_suite(toy_dir / "eval" / "test" / "copy.jsonl")[:4]
    native = evaluate(tiny_params, tiny_config, tok, items, batch_size=8, max_new_tokens=24, keep_items=True)
    want = [r["output"].split("<|user|>")[0].split("<|assistant|>")[0] for r in native.items]
    assert lm_out == want
    # MC: lm-eval's per-choice log-likelihoods are ptm's for the choice after the chat prompt (lm-eval moves the
    # prompt's trailing "\n" into the continuation, as for any backend).
    doc = res["samples"]["ptm_toy_world_qa_mc"][0]
    prompt = encode_prompt(doc["doc"]["messages"], tok)
    args = list(doc["arguments"].values()) if isinstance(doc["arguments"], dict) else list(doc["arguments"])
    assert all(a[0].endswith("<|assistant|>\n") for a in args) and prompt[-1] == tok.encode("\n")[0]
    pairs = [(prompt[:-1], prompt[-1:] + tok.encode(a[1])) for a in args]
    ref = decode.loglikelihoods(tiny_params, tiny_config, tok, pairs)
    got = [r[0][0] if isinstance(r[0], list | tuple) else r[0] for r in doc["resps"]]
    np.testing.assert_allclose(got, [r[0] for r in ref], rtol=1e-5)


def _save(path, cfg, params):
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", params)
    ckptr.wait_until_finished()
    ckpt_format.write_meta(path, ckpt_format.make_meta(cfg.to_dict(), step=1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_config, tiny_params):
    d = tmp_path_factory.mktemp("lmckpt") / "step_1"
    _save(d, tiny_config, tiny_params)
    return d


def test_ptm_eval_lm_eval_checkpoint_and_in_memory_recipe(ckpt, toy_dir, tiny_config, tiny_params, tmp_path, tok):
    from ptm.cli import main

    skill = tmp_path / "skill"
    skill_params = jax.tree.map(lambda x: x * 0.5, tiny_params)
    _save(skill, tiny_config, skill_params)
    toml = tmp_path / "ptm.toml"
    toml.write_text(f'method = "task_arithmetic"\nomega = 0.5\nout = "{tmp_path / "never"}"\n\n'
                    f'[inputs]\npre = "{ckpt}"\ngeneral = "{ckpt}"\nskills = ["{skill}"]\n')
    out = tmp_path / "res.json"
    args = ["eval", str(ckpt), "--recipe", str(toml), "--lm-eval", "ptm_toy_world_qa_mc",
            "--lm-eval-include", str(CONFIGS), "--lm-eval-data", str(toy_dir), "--apply-chat-template",
            "--lm-eval-limit", "4", "--batch-size", "8", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert not (tmp_path / "never").exists()
    ck, rec = json.loads(out.read_text())["results"]
    assert ck["kind"] == "checkpoint" and rec["kind"] == "recipe"
    merged = jax.tree.map(lambda g, s: g + 0.5 * (s - g), tiny_params, skill_params)
    for r, params in ((ck, tiny_params), (rec, merged)):
        lm = L.PtmLM.from_params(params, tiny_config, tok, batch_size=8)
        lib = L.simple_evaluate(lm, ["ptm_toy_world_qa_mc"], include=[str(CONFIGS)], data=str(toy_dir),
                                apply_chat_template=True, limit=4)
        assert r["lm_eval"]["metrics"] == L.headline(lib)
    # Missing data dir: a clear error naming the variable, not a traceback.
    assert main(["eval", str(ckpt), "--lm-eval", "ptm_toy_copy", "--lm-eval-include", str(CONFIGS),
                 "--lm-eval-limit", "1"]) == 2


def test_ptm_lm_eval_cli_is_lm_evals_cli_with_ptm_registered(ckpt, toy_dir, tmp_path, monkeypatch, capsys):
    from ptm.cli import main

    monkeypatch.setenv("PTM_LM_EVAL_DATA", str(toy_dir))
    # lm-eval's CLI always indexes its ~15k built-in task YAMLs too (~15 s here); the test only needs ours.
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    rc = main(["lm-eval", "--model", "ptm", "--model_args", f"checkpoint={ckpt},dtype=float32", "--batch_size", "8",
               "--tasks", "ptm_toy_world_qa_mc", "--include_path", str(CONFIGS), "--limit", "2",
               "--output_path", str(tmp_path / "out")])
    assert rc == 0
    assert "ptm_toy_world_qa_mc" in capsys.readouterr().out
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_task_specs_for_experiments(tiny_params, tiny_config, tok, toy_dir):
    assert L.parse_task_spec("lm_eval:gsm8k:exact_match,flexible-extract") == ("gsm8k", "exact_match,flexible-extract")
    with pytest.raises(L.ConfigError):
        L.parse_task_spec("gsm8k")
    assert L.pick_metric({"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7}, None) == ("acc,none", 0.5)
    assert L.pick_metric({"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3},
                         "exact_match,flexible-extract")[1] == 0.3
    out = L.score_task_specs(tiny_params, tiny_config, tok, ["lm_eval:ptm_toy_world_qa_mc",
                                                             "lm_eval:ptm_toy_world_qa_mc:acc_norm",
                                                             "lm_eval:ptm_toy_answers_ppl:word_perplexity"],
                             include=[str(CONFIGS)], data=str(toy_dir), limit=4, batch_size=8)
    assert out["lm_eval:ptm_toy_world_qa_mc"]["metric"] == "acc,none"
    assert 0 <= out["lm_eval:ptm_toy_world_qa_mc:acc_norm"]["score"] <= 1
    assert out["lm_eval:ptm_toy_answers_ppl:word_perplexity"]["score"] > 1
    assert out["lm_eval:ptm_toy_answers_ppl:word_perplexity"]["higher_is_better"] is False
    assert out["lm_eval:ptm_toy_world_qa_mc"]["higher_is_better"] is True
