"""seqio Tasks outside t5x's single-source batches: `load_tokenizer('seqio:NAME')`, LM Tasks/Mixtures read as
examples into ptm's planner (DataConfig.seqio_lm='examples', what `ptm experiment` uses) and `seqio:TASK[:SPLIT]`
eval sets."""

from __future__ import annotations

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the optional `seqio` extra is not installed (pip install -e .[seqio])")

import seqio_tasks  # noqa: E402  (registers the test Tasks)
from datahelpers import write_jsonl  # noqa: E402

from ptm.data.pipeline import DataConfig, SourceConfig, build_eval_batches, build_train_data  # noqa: E402
from ptm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, load_tokenizer  # noqa: E402
from ptm.errors import ConfigError, DataError  # noqa: E402
from ptm.eval.evalset import load_suite  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("seqio:ptm_lm")


# --- load_tokenizer("seqio:NAME") -------------------------------------------------------------------------------

def test_tokenizer_is_the_tasks_sentencepiece_vocabulary(tok):
    assert isinstance(tok, SentencePieceTokenizer) and tok.path == seqio_tasks.SPM_PATH
    v = seqio_tasks.VOCAB
    assert (tok.vocab_size, tok.eos_id) == (v.vocab_size, v.eos_id)
    text = seqio_tasks.LM_DOCS[3]
    assert tok.encode(text) == list(v.encode(text)) and tok.decode(tok.encode(text)) == v.decode(v.encode(text))
    extra = load_tokenizer("seqio:ptm_extra_ids")  # T5-style sentinels count in the vocabulary
    assert extra.vocab_size == tok.vocab_size + 8 == seqio.get_mixture_or_task("ptm_extra_ids").output_features[
        "targets"].vocabulary.vocab_size
    assert extra.decode([*tok.encode("alpha"), tok.vocab_size + 3]) == "alpha"
    assert load_tokenizer("seqio:ptm_prefix").path == seqio_tasks.SPM_PATH


def test_tokenizer_refuses_other_vocabularies():
    with pytest.raises(ConfigError, match=r"seqio:ptm_bytevocab: its vocabulary is a ByteVocabulary; .*"
                       r"SentencePieceVocabulary"):
        load_tokenizer("seqio:ptm_bytevocab")
    with pytest.raises(ConfigError, match=r"seqio:ptm_chat: no 'inputs'/'targets' output feature"):
        load_tokenizer("seqio:ptm_chat")
    with pytest.raises(ConfigError, match=r"no Task or Mixture named 'ptm_nope'"):
        load_tokenizer("seqio:ptm_nope")


# --- LM Tasks as examples for ptm's planner ---------------------------------------------------------------------

@pytest.mark.parametrize("name,tfl", [("ptm_lm", {"targets": 128}), ("ptm_prefix", {"inputs": 64, "targets": 64})])
def test_examples_are_seqios_unpacked_decoder_features(name, tfl, tok):
    cfg = DataConfig(sources=[SourceConfig(f"seqio:{name}")], seq_len=128, global_batch_size=4, shuffle=False,
                     pack=False, seqio_lm="examples")
    it, stats = build_train_data(cfg, tok)
    ours = list(it)
    ref = list(seqio.get_dataset(name, tfl, seqio.DecoderFeatureConverter(pack=False), dataset_split="train",
                                 shuffle=False, num_epochs=1, batch_size=4).as_numpy_iterator())
    assert len(ours) == len(ref) == stats.num_batches
    for a, b in zip(ours, ref, strict=True):
        rows = b["decoder_target_tokens"].shape[0]
        real = a["segment_ids"][:rows] > 0
        np.testing.assert_array_equal(real, b["decoder_target_tokens"] != 0)
        for ours_key, seqio_key in (("inputs", "decoder_input_tokens"), ("targets", "decoder_target_tokens"),
                                    ("loss_mask", "decoder_loss_weights")):
            # (unpacked, seqio shifts across the padding: the EOS reappears as the input after the last target)
            np.testing.assert_array_equal(np.where(real, a[ours_key][:rows], 0), np.where(real, b[seqio_key], 0),
                                          err_msg=ours_key)
    assert stats.examples == (120 if name == "ptm_lm" else 80) and stats.skipped == stats.dropped == 0


def test_examples_take_subsets_rates_and_mix_with_jsonl(tmp_path, tok):
    chat = write_jsonl(tmp_path / "chat.jsonl", seqio_tasks.chat_records())
    cfg = DataConfig(sources=[SourceConfig("seqio:ptm_prefix", max_examples=30), SourceConfig(chat, rate=0.5),
                              SourceConfig("seqio:ptm_chat", max_examples=10)],
                     seq_len=64, global_batch_size=8, num_epochs=2, seqio_lm="examples")
    it, stats = build_train_data(cfg, tok)
    assert stats.examples == 30 + 40 + 10 and stats.examples_seen == 2 * (30 + 20 + 10)
    assert len(list(it)) == stats.num_batches
    small = build_train_data(DataConfig(sources=[SourceConfig("seqio:ptm_prefix", max_examples=12)], seq_len=64,
                                        global_batch_size=8, shuffle=False, pack=False, seqio_lm="examples"), tok)
    big = build_train_data(DataConfig(sources=[SourceConfig("seqio:ptm_prefix", max_examples=30)], seq_len=64,
                                      global_batch_size=8, shuffle=False, pack=False, seqio_lm="examples"), tok)
    rows = lambda it: {tuple(r) for b in it for r, s in zip(b["targets"], b["segment_ids"], strict=True) if s.any()}
    assert rows(small[0]) < rows(big[0])  # D_i subsets nest, as for JSONL
    held, _ = build_eval_batches(DataConfig(sources=[SourceConfig("seqio:ptm_lm")], seq_len=64, global_batch_size=8,
                                            seqio_lm="examples"), tok)
    assert sum(int(b["segment_ids"].max(1).sum()) for b in held) == 120


def test_a_mixture_is_sampled_by_its_rates_until_the_first_task_runs_out(tok):
    cfg = DataConfig(sources=[SourceConfig("seqio:ptm_mix")], seq_len=64, global_batch_size=8, seqio_lm="examples")
    it, stats = build_train_data(cfg, tok)
    assert stats.examples == 200 + 67  # rates 3 : 1 over 200 + 200 examples: all of a, a third of b
    letters = [tok.decode(r[s == k][1:]).lstrip()[:1] for b in it for r, s in zip(b["inputs"], b["segment_ids"],
                                                                                  strict=True)
               for k in set(s.tolist()) - {0}]
    assert sum(c in "abcdefgh" for c in letters) == 200 and sum(c in "qrstuvwx" for c in letters) == 67


def test_examples_mode_checks_the_vocabulary_and_the_split(tok):
    cfg = DataConfig(sources=[SourceConfig("seqio:ptm_lm")], seq_len=64, global_batch_size=8, seqio_lm="examples")
    with pytest.raises(ConfigError, match=r"does not match the run's tokenizer 'byte'"):
        build_train_data(cfg, ByteTokenizer())
    with pytest.raises(DataError, match=r"seqio:ptm_prefix has no split 'validation' \(splits: train\)"):
        build_train_data(DataConfig(sources=[SourceConfig("seqio:ptm_prefix")], split="validation",
                                    seqio_lm="examples"), tok)
    with pytest.raises(ConfigError, match=r"seqio_lm must be one of"):
        build_train_data(DataConfig(sources=[SourceConfig("seqio:ptm_lm")], seqio_lm="tx5"), tok)


# --- eval sets: seqio:TASK[:SPLIT][?scorer=...] ---------------------------------------------------------------

def test_eval_set_from_a_task_split_with_its_metric_as_scorer():
    items = load_suite("seqio:ptm_qa:validation")
    assert [(i.messages[0]["content"], i.reference) for i in items] == seqio_tasks.QA_VALIDATION
    assert {i.task for i in items} == {"ptm_qa"} and {i.scorer for i in items} == {"exact_match"}  # sequence_accuracy
    assert load_suite("seqio:ptm_qa") == items  # the split defaults to validation
    ppl = load_suite("seqio:ptm_lm:validation?max_items=3&category=lm")
    assert [(i.reference, i.scorer, i.category, i.messages) for i in ppl] == [
        (d, "perplexity", "lm", []) for d in seqio_tasks.LM_DOCS[:3]]
    mix = load_suite(["seqio:ptm_evals?max_items=2", "seqio:ptm_bleu:validation?scorer=contains"])
    assert [i.task for i in mix] == ["ptm_qa"] * 2 + ["ptm_qa2"] * 2 + ["ptm_bleu"] * 6
    assert mix[-1].scorer == "contains"


def test_eval_set_errors_name_the_spec():
    with pytest.raises(DataError, match=r"seqio:ptm_bleu: cannot choose a scorer from the Task's metrics \['bleu'\]"
                       r".*add \?scorer=NAME"):
        load_suite("seqio:ptm_bleu")
    with pytest.raises(DataError, match=r"seqio:ptm_qa has no split 'test' \(splits: train, validation\)"):
        load_suite("seqio:ptm_qa:test")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['scorr'\]"):
        load_suite("seqio:ptm_qa?scorr=exact_match")
    with pytest.raises(DataError, match=r"unknown scorer 'nope'"):
        load_suite("seqio:ptm_qa?scorer=nope")
    with pytest.raises(ConfigError, match=r"no Task or Mixture named 'ptm_qaa' \(closest: ptm_qa"):
        load_suite("seqio:ptm_qaa:validation")


def test_ptm_eval_cli_on_a_seqio_task_fails_before_loading_a_model(tmp_path, capsys):
    from ptm.cli import main

    missing = str(tmp_path / "no_checkpoint")
    assert main(["eval", missing, "--seqio_module=seqio_tasks", "--suite", "seqio:ptm_qa:test"]) == 2
    assert "seqio:ptm_qa has no split 'test'" in capsys.readouterr().err
    assert main(["eval", missing, "--seqio_module=no_such_tasks", "--suite", "seqio:ptm_qa"]) == 2
    assert "seqio module 'no_such_tasks' failed to import" in capsys.readouterr().err
