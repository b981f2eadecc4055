"""Parity with lm-eval's own `hf` backend: a tiny random Llama built with transformers, converted with
`ptm.convert.hf.hf_to_ptm`, one byte-level BPE tokenizer for both, the same local tasks (multiple choice, generation,
rolling log-likelihood) through lm-eval: per-request log-likelihoods within 1e-4, identical accuracies and identical
greedy generations."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="parity needs torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="parity needs transformers")
lm_eval = pytest.importorskip("lm_eval", reason="parity needs lm-eval (pip install 'ptm[lm_eval]')")
pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate (pip install accelerate)")

import json  # noqa: E402

from ptm.convert.hf import hf_to_ptm  # noqa: E402
from ptm.eval import lm_eval_model as L  # noqa: E402

WORDS = ("red blue green gold cat dog fox hen Varn Olo Krell Tillo one two three four five the a is of and to "
         "which what colour pet city lives likes owns").split()


def _docs():
    rng = np.random.default_rng(0)
    mc, gen, text = [], [], []
    for i in range(6):
        q = " ".join(rng.choice(WORDS, 6))
        choices = [" ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in range(4)]
        mc.append({"question": f"Q{i}: {q}?", "choices": choices, "answer": int(rng.integers(0, 4))})
        gen.append({"prompt": f"Say {q}:", "target": q})
        text.append({"text": " ".join(rng.choice(WORDS, 80)) + "."})
    return mc, gen, text


def _tokenizer(corpus, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


YAMLS = {
    "par_mc": """task: par_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: "${TASK_DIR}/mc.jsonl"
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "par_gen": """task: par_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: "${TASK_DIR}/gen.jsonl"
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "par_ppl": """task: par_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: "${TASK_DIR}/text.jsonl"
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    mc, gen, text = _docs()
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (("mc", mc), ("gen", gen), ("text", text)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, y in YAMLS.items():
        (tasks / f"{name}.yaml").write_text(y)
    hf = root / "hf"
    corpus = [d["question"] + " " + " ".join(d["choices"]) for d in mc] + [d["text"] for d in text]
    fast = _tokenizer(corpus * 3, hf)
    cfg = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(hf)
    hf_to_ptm(str(hf), str(root / "ptm"))
    return root, tasks, hf


def _run(model, model_args, tasks_dir):
    root, (staged,) = L.stage_task_dirs([tasks_dir])
    try:
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=[staged], include_defaults=False)
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(YAMLS), task_manager=tm,
                                       batch_size=4, log_samples=True, bootstrap_iters=0)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _resps(res, task):
    return [[r[0] if isinstance(r, list | tuple) else r for r in s["resps"]]
            for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_ptm_backend_matches_lm_eval_hf_backend(setup):
    root, tasks, hf = setup
    ref = _run("hf", f"pretrained={hf},dtype=float32,device=cpu", tasks)
    # This tokenizer.json has no post-processor, so transformers adds no BOS; ptm's default (BOS when the tokenizer
    # has one, as ptm's chat data and Llama do) is switched off to feed both backends the same ids.
    got = _run("ptm", f"checkpoint={root / 'ptm'},tokenizer={hf / 'tokenizer.json'},dtype=float32,"
               "add_bos_token=False", tasks)
    # multiple choice: every option's log-likelihood, and the accuracies
    for a, b in zip(_resps(got, "par_mc"), _resps(ref, "par_mc"), strict=True):
        np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-4, rtol=0)
        assert [x[1] for x in a] == [x[1] for x in b]  # is_greedy
    for m in ("acc,none", "acc_norm,none"):
        assert got["results"]["par_mc"][m] == ref["results"]["par_mc"][m]
    # greedy generations, character for character
    gen_ptm, gen_hf = _resps(got, "par_gen"), _resps(ref, "par_gen")
    assert gen_ptm == gen_hf and any(g[0] for g in gen_hf)
    # rolling log-likelihood over texts longer than the context (64): windows as lm-eval defines them
    for a, b in zip(_resps(got, "par_ppl"), _resps(ref, "par_ppl"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    mc = [abs(x[0] - y[0]) for a, b in zip(_resps(got, "par_mc"), _resps(ref, "par_mc"), strict=True)
          for x, y in zip(a, b, strict=True)]
    roll = [abs(a[0] - b[0]) for a, b in zip(_resps(got, "par_ppl"), _resps(ref, "par_ppl"), strict=True)]
    print(f"\nparity: max |d loglik| {max(mc):.2e} over {len(mc)} choice requests, {max(roll):.2e} over "
          f"{len(roll)} rolling requests; {len(gen_hf)} greedy generations identical")
