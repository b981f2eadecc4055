"""seqio Tasks and a Mixture over local files, for tests/data/test_seqio*.py (and `--seqio_module=seqio_tasks`).

Importing this module writes its data (deterministic) into `$PTM_SEQIO_TEST_DIR` (a fresh temporary directory
if unset; files already there are reused) and registers:
- `ptm_lm`: targets-only LM over a text file (one document per line);
- `ptm_prefix`: prefix-LM over a TSV file (`inputs<TAB>targets`);
- `ptm_mix_a`, `ptm_mix_b` and the Mixture `ptm_mix` (rates 3 : 1); a-docs use letters a-h, b-docs q-x;
- `ptm_chat`: chat data over a JSONL file (each line `{"messages": [...]}`), the `messages` feature is its text;
- `ptm_nofeatures`: a Task whose only output feature is `text` (neither targets nor messages);
- `ptm_qa`: prefix-LM with a `validation` split and t5's `sequence_accuracy` metric (an eval set for `ptm eval`),
  `ptm_bleu`: the same with a metric ptm has no scorer for, and the Mixture `ptm_evals` = ptm_qa + `ptm_qa2`
  (another validation file);
- `ptm_bytevocab` (seqio's ByteVocabulary) and `ptm_extra_ids` (the SentencePiece model + 8 extra ids).
All LM tasks use a SentencePiece vocabulary trained here (T5 ids: pad 0, eos 1, unk 2; no BOS), `spm.model`.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path

import seqio
import tensorflow as tf

DIR = Path(os.environ.get("PTM_SEQIO_TEST_DIR") or tempfile.mkdtemp(prefix="ptm-seqio-"))
WORDS = "alpha beta gamma delta river stone cloud light seven orbit quiet amber".split()


def _docs(n: int, seed: int, letters: str | None = None) -> list[str]:
    r = random.Random(seed)
    if letters:
        return ["".join(r.choice(letters) for _ in range(r.randint(4, 30))) for _ in range(n)]
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(2, 12))) for _ in range(n)]


def chat_records(n: int = 40, seed: int = 5) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        a = "".join(r.choice("abcd") for _ in range(r.randint(2, 6)))
        msgs = [{"role": "user", "content": f"rev {a}"}, {"role": "assistant", "content": a[::-1]}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}, *msgs,
                    {"role": "user", "content": "again, ünïcode"}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    return out


LM_DOCS = [f"doc{i} " + d for i, d in enumerate(_docs(120, 1))]
PREFIX_PAIRS = [(f"q{i} " + a, b) for i, (a, b) in enumerate(zip(_docs(80, 2), _docs(80, 3), strict=True))]
MIX_A, MIX_B = _docs(200, 4, "abcdefgh"), _docs(200, 6, "qrstuvwx")


def _write(name: str, lines: list[str]) -> str:
    p = DIR / name
    if not p.exists():
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(p)
    return str(p)


def _train_spm() -> str:
    p = DIR / "spm.model"
    if not p.exists():
        import sentencepiece as spm

        buf = io.BytesIO()
        corpus = LM_DOCS + [a + " " + b for a, b in PREFIX_PAIRS] + MIX_A + MIX_B
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(p)
    return str(p)


DIR.mkdir(parents=True, exist_ok=True)
SPM_PATH = _train_spm()
VOCAB = seqio.SentencePieceVocabulary(SPM_PATH)
LM_FILE = _write("lm.txt", LM_DOCS)
PREFIX_FILE = _write("prefix.tsv", [f"{a}\t{b}" for a, b in PREFIX_PAIRS])
MIX_A_FILE, MIX_B_FILE = _write("mix_a.txt", MIX_A), _write("mix_b.txt", MIX_B)
CHAT_FILE = _write("chat.jsonl", [json.dumps(r, ensure_ascii=False) for r in chat_records()])

LM_FEATURES = {"targets": seqio.Feature(VOCAB, add_eos=True)}
PREFIX_FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)}


def _as_targets(ds):
    return ds.map(lambda line: {"targets": line}, num_parallel_calls=tf.data.AUTOTUNE)


def _split_tsv(ds):
    def fn(line):
        parts = tf.strings.split(line, "\t", maxsplit=1)
        return {"inputs": parts[0], "targets": parts[1]}

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _as_messages(ds):
    return ds.map(lambda line: {"messages": line}, num_parallel_calls=tf.data.AUTOTUNE)


_LM_PREPROCESSORS = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def _add(name, source, preprocessors, features, **kw):
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors, output_features=features, **kw)


def _lines(path: str, **splits):
    return seqio.TextLineDataSource({"train": path, **splits})


_add("ptm_lm", _lines(LM_FILE, validation=LM_FILE), [_as_targets, *_LM_PREPROCESSORS], LM_FEATURES)
_add("ptm_prefix", _lines(PREFIX_FILE), [_split_tsv, *_LM_PREPROCESSORS], PREFIX_FEATURES)
_add("ptm_mix_a", _lines(MIX_A_FILE), [_as_targets, *_LM_PREPROCESSORS], LM_FEATURES)
_add("ptm_mix_b", _lines(MIX_B_FILE), [_as_targets, *_LM_PREPROCESSORS], LM_FEATURES)
_add("ptm_chat", _lines(CHAT_FILE), [_as_messages],
     {"messages": seqio.Feature(seqio.PassThroughVocabulary(1), dtype=tf.string, rank=0, add_eos=False)})
_add("ptm_nofeatures", _lines(LM_FILE), [lambda ds: ds.map(lambda line: {"text": line})],
     {"text": seqio.Feature(seqio.PassThroughVocabulary(1), dtype=tf.string, rank=0, add_eos=False)})


def sequence_accuracy(targets, predictions):
    """t5.evaluation.metrics.sequence_accuracy (ptm maps a metric of this name onto its exact_match scorer)."""
    return {"sequence_accuracy": 100 * sum(t == p for t, p in zip(targets, predictions, strict=True)) / len(targets)}


def bleu(targets, predictions):
    return {"bleu": 0.0}


QA_VALIDATION, QA2_VALIDATION = PREFIX_PAIRS[:6], PREFIX_PAIRS[6:10]
QA_VAL_FILE = _write("qa_validation.tsv", [f"{a}\t{b}" for a, b in QA_VALIDATION])
QA2_VAL_FILE = _write("qa2_validation.tsv", [f"{a}\t{b}" for a, b in QA2_VALIDATION])
_add("ptm_qa", _lines(PREFIX_FILE, validation=QA_VAL_FILE), [_split_tsv, *_LM_PREPROCESSORS], PREFIX_FEATURES,
     metric_fns=[sequence_accuracy])
_add("ptm_qa2", _lines(PREFIX_FILE, validation=QA2_VAL_FILE), [_split_tsv, *_LM_PREPROCESSORS], PREFIX_FEATURES,
     metric_fns=[sequence_accuracy])
_add("ptm_bleu", _lines(PREFIX_FILE, validation=QA_VAL_FILE), [_split_tsv, *_LM_PREPROCESSORS], PREFIX_FEATURES,
     metric_fns=[bleu])
_add("ptm_bytevocab", _lines(LM_FILE), [_as_targets, *_LM_PREPROCESSORS],
     {"targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=True)})
_add("ptm_extra_ids", _lines(LM_FILE), [_as_targets, *_LM_PREPROCESSORS],
     {"targets": seqio.Feature(seqio.SentencePieceVocabulary(SPM_PATH, extra_ids=8), add_eos=True)})
for _name, _tasks in (("ptm_mix", [("ptm_mix_a", 3.0), ("ptm_mix_b", 1.0)]),
                      ("ptm_evals", [("ptm_qa", 1.0), ("ptm_qa2", 1.0)])):
    if _name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(_name)
    seqio.MixtureRegistry.add(_name, _tasks)
