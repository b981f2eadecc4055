"""The harness with a real (tiny, random) model: KV-cache decoding, stops, sampling, log-likelihoods."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptm.data.chat import encode_prompt
from ptm.errors import CheckpointError, DataError
from ptm.eval.decode import GenerationConfig, compiled_for, generate
from ptm.eval.evalset import load_suite, parse_item
from ptm.eval.harness import check_vocab, evaluate
from ptm.model.config import ModelConfig
from ptm.model.llama import forward
from ptm.parallel.mesh import MeshConfig, make_mesh


def user(text):
    return [{"role": "user", "content": text}]


REF_LEN = 128


@functools.partial(jax.jit, static_argnums=1)
def _ref_logits(params, cfg, x, positions, segs):
    return forward(params, cfg, x, positions, segs)


def full_logprobs(params, cfg, ids, vocab=259):
    """log p(ids[t] | ids[:t]) for every t >= 1 and the argmax, by one full forward pass without a cache.

    Right-padded to a fixed length (causal attention: padding after the sequence changes nothing) so the
    reference compiles once. Log-probs are over the tokenizer's 259 ids: the model's vocab is padded to 260
    and the harness never assigns mass to the padding id."""
    n = len(ids) - 1
    assert n <= REF_LEN
    x = np.zeros((1, REF_LEN), np.int32)
    x[0, :n] = ids[:-1]
    segs = (np.arange(REF_LEN) < n).astype(np.int32)[None]
    logits = _ref_logits(params, cfg, x, np.arange(REF_LEN, dtype=np.int32)[None], segs)[0, :n, :vocab]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1)), np.asarray(jnp.argmax(logits, axis=-1))


def test_kv_cache_decoding_matches_full_recompute(tiny_config, tiny_params, tok):
    # Prompt lengths differ a lot (left padding), 5 prompts in batches of 4 (a filled last batch), and 40 new
    # tokens cross two decode-chunk boundaries.
    prompts = [encode_prompt(user("x" * n), tok) for n in (1, 7, 30, 3, 55)]
    gens = generate(
        tiny_params, tiny_config, tok, prompts, GenerationConfig(max_new_tokens=40, chunk=16), batch_size=4
    )
    checked = 0
    for p, g in zip(prompts, gens, strict=True):
        assert g.finish in ("eos", "length")
        seq = p + g.tokens + ([tok.eos_id] if g.finish == "eos" else [])
        logp, argmax = full_logprobs(tiny_params, tiny_config, seq)
        steps = np.arange(len(p) - 1, len(seq) - 1)
        np.testing.assert_array_equal(argmax[steps], seq[len(p) :])  # greedy == argmax of full recomputation
        np.testing.assert_allclose(np.array(g.logprobs), logp[steps[: len(g.tokens)], g.tokens], atol=2e-5)
        checked += len(g.tokens)
    assert checked > 100


def test_stop_strings_truncate_and_finish(tiny_config, tiny_params, tok):
    prompts = [encode_prompt(user(f"tell me {i}"), tok) for i in range(3)]
    gen = GenerationConfig(max_new_tokens=40)
    plain = generate(tiny_params, tiny_config, tok, prompts, gen, batch_size=4)
    stop = plain[0].text[10:12]
    assert len(stop) == 2
    stopped = generate(tiny_params, tiny_config, tok, prompts, gen, batch_size=4, stops=[(stop,), (), ()])
    assert stopped[0].finish == "stop"
    assert stopped[0].text == plain[0].text[: plain[0].text.find(stop)]
    assert [g.text for g in stopped[1:]] == [g.text for g in plain[1:]]  # other rows unaffected
    # a global stop string applies to every row
    glob = generate(
        tiny_params,
        tiny_config,
        tok,
        prompts,
        GenerationConfig(max_new_tokens=40, stop=(stop,)),
        batch_size=4,
    )
    assert glob[0].text == stopped[0].text


def test_sampling_is_seeded_and_batch_independent(tiny_config, tiny_params, tok):
    prompts = [encode_prompt(user(f"story {i}"), tok) for i in range(6)]
    hot = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=3)
    a = generate(tiny_params, tiny_config, tok, prompts, hot, batch_size=4)
    # Same prompts in another order (other batch-mates and rows); sampling streams follow row_ids, not slots.
    perm = [5, 2, 0, 4, 1, 3]
    b = generate(tiny_params, tiny_config, tok, [prompts[i] for i in perm], hot, batch_size=4, row_ids=perm)
    b = [b[perm.index(i)] for i in range(6)]
    c = generate(
        tiny_params,
        tiny_config,
        tok,
        prompts,
        GenerationConfig(max_new_tokens=40, temperature=1.0, seed=4),
        batch_size=4,
    )
    greedy = generate(
        tiny_params, tiny_config, tok, prompts, GenerationConfig(max_new_tokens=40), batch_size=4
    )
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert [g.tokens for g in a] != [g.tokens for g in greedy]
    # nucleus with a tiny p keeps only the top token: same as greedy
    nucleus = generate(
        tiny_params,
        tiny_config,
        tok,
        prompts,
        GenerationConfig(max_new_tokens=40, temperature=1.0, top_p=1e-6, seed=3),
        batch_size=4,
    )
    assert [g.tokens for g in nucleus] == [g.tokens for g in greedy]


def _items(objs):
    return [parse_item(o, f"mem:{i + 1}") for i, o in enumerate(objs)]


def test_multiple_choice_picks_higher_likelihood_option(tiny_config, tiny_params, tok):
    choices = ["red", "green", "blue", "a much longer colour name"]
    objs = [
        {
            "task": "mc",
            "messages": user(f"Colour number {i}?"),
            "reference": choices[i % 4],
            "choices": choices,
            "scorer": "multiple_choice",
        }
        for i in range(8)
    ]
    res = evaluate(tiny_params, tiny_config, tok, _items(objs), batch_size=4, keep_items=True)
    correct = 0
    for o, rec in zip(objs, res.items, strict=True):
        prompt = encode_prompt(o["messages"], tok)
        lls = []
        for c in choices:
            seq = prompt + tok.encode(c) + [tok.eos_id]
            logp, _ = full_logprobs(tiny_params, tiny_config, seq)
            steps = np.arange(len(prompt) - 1, len(seq) - 1)
            lls.append(float(logp[steps, seq[len(prompt) :]].sum()))
        np.testing.assert_allclose(rec["logliks"], lls, rtol=1e-4)
        assert rec["output"] == choices[int(np.argmax(lls))]
        correct += rec["output"] == o["reference"]
    assert res.tasks["mc"].metrics["acc"] == correct / len(objs)


def test_perplexity_is_exp_mean_nll(tiny_config, tiny_params, tok):
    texts = ["The quick brown fox.", "Held-out text, a bit longer than the first one."]
    objs = [{"task": "ppl", "messages": [], "reference": t, "scorer": "perplexity"} for t in texts]
    res = evaluate(tiny_params, tiny_config, tok, _items(objs), batch_size=4)
    nll, n = 0.0, 0
    for t in texts:
        seq = [tok.bos_id] + tok.encode(t)
        logp, _ = full_logprobs(tiny_params, tiny_config, seq)
        nll -= float(logp[np.arange(len(seq) - 1), seq[1:]].sum())
        n += len(seq) - 1
    assert math.isclose(res.tasks["ppl"].score, math.exp(nll / n), rel_tol=1e-4)
    assert res.tasks["ppl"].metrics["tokens"] == n
    assert res.categories == {}  # perplexity does not enter the (accuracy) averages


def test_vocab_mismatch_is_a_checkpoint_error(tok, tiny_params, tiny_config, suite_dir):
    with pytest.raises(CheckpointError, match="vocab_size=200 does not match tokenizer 'byte'"):
        check_vocab(ModelConfig(vocab_size=200), tok, "ckpt")
    with pytest.raises(CheckpointError, match="vocab_size=1000"):
        evaluate(tiny_params, ModelConfig(vocab_size=1000), tok, suite_dir)
    check_vocab(ModelConfig(vocab_size=259), tok)  # exact
    check_vocab(ModelConfig(vocab_size=384), tok)  # padded to a multiple of 128


def test_inconsistent_task_is_rejected(tiny_config, tiny_params, tok):
    a = {"task": "t", "messages": user("q"), "reference": "1", "scorer": "final_number"}
    with pytest.raises(DataError, match="mem:2: task 't' has scorer/category exact_match"):
        evaluate(tiny_params, tiny_config, tok, _items([a, {**a, "scorer": "exact_match"}]))


def test_evaluate_suite_aggregates_and_reuses_compilation(tiny_config, tiny_params, tok, suite_dir):
    items = load_suite(suite_dir)
    res = evaluate(tiny_params, tiny_config, tok, items, batch_size=4, max_new_tokens=40)
    d = json.loads(json.dumps(res.to_dict()))  # JSON-serialisable
    assert set(d["tasks"]) == {"mmlu_toy", "gsm_toy", "capital", "xstest_toy", "arith_code", "heldout_ppl"}
    assert {t: d["tasks"][t]["n_items"] for t in d["tasks"]} == {t: 8 for t in d["tasks"]}
    general = [res.tasks[t].score for t in ("mmlu_toy", "gsm_toy", "capital")]
    assert math.isclose(res.categories["general"], float(np.mean(general)))
    assert set(res.categories) == {"general", "safety", "coding"}
    assert res.counts["generated_sequences"] == 32 and res.counts["loglik_sequences"] == 40
    assert res.examples_per_s > 0 and all(len(t.examples) == 2 for t in res.tasks.values())

    # A different model of the same config (as in a merge sweep) compiles nothing new.
    fns = compiled_for(tiny_config, None, tok.vocab_size)
    sizes = (fns._prefill._cache_size(), fns._decode._cache_size(), fns._loglik._cache_size())
    other = jax.tree.map(lambda x: x * 1.01, tiny_params)
    res2 = evaluate(other, tiny_config, tok, items, batch_size=4, max_new_tokens=40)
    assert res2.counts["new_compiled_shapes"] == 0
    assert (fns._prefill._cache_size(), fns._decode._cache_size(), fns._loglik._cache_size()) == sizes
    assert res2.tasks["heldout_ppl"].score != res.tasks["heldout_ppl"].score


def test_sharded_evaluation_matches_single_device(tiny_config, tiny_params, tok, suite_dir):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    items = load_suite(suite_dir)
    kw = dict(batch_size=4, max_new_tokens=40, keep_items=True)
    single = evaluate(tiny_params, tiny_config, tok, items, **kw)
    sharded = evaluate(tiny_params, tiny_config, tok, items, mesh=mesh, **kw)
    assert sharded.settings["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    for a, b in zip(single.items, sharded.items, strict=True):
        assert a.get("output") == b.get("output")
        assert math.isclose(a.get("nll", 0.0), b.get("nll", 0.0), rel_tol=1e-4)
    for t in single.tasks:
        assert math.isclose(single.tasks[t].score, sharded.tasks[t].score, rel_tol=1e-4)
