"""seqio Tasks/Mixtures as ptm training data: t5x's decoder batches exactly, chat == JSONL, shards, rates, errors."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the optional `seqio` extra is not installed (pip install -e .[seqio])")

import seqio_tasks  # noqa: E402  (registers the test Tasks; needs seqio)
from datahelpers import write_jsonl  # noqa: E402

from ptm.data.pipeline import DataConfig, SourceConfig, build_train_data  # noqa: E402
from ptm.data.tokenizers import ByteTokenizer, load_tokenizer  # noqa: E402
from ptm.errors import ConfigError, DataError  # noqa: E402

KEYS = {"decoder_input_tokens": "inputs", "decoder_target_tokens": "targets", "decoder_loss_weights": "loss_mask",
        "decoder_segment_ids": "segment_ids", "decoder_positions": "positions"}


@pytest.fixture(scope="module")
def sp_tok():
    return load_tokenizer(seqio_tasks.SPM_PATH)


def _all(it) -> list[dict]:
    return list(it)


def _seqio_reference(name, tfl, *, batch, seed, epochs, shard=(0, 1), num_steps=None):
    ds = seqio.get_dataset(name, task_feature_lengths=tfl, feature_converter=seqio.DecoderFeatureConverter(pack=True),
                           dataset_split="train", shuffle=True, num_epochs=epochs, seed=seed, batch_size=batch,
                           shard_info=seqio.ShardInfo(*shard))
    if num_steps:
        ds = ds.take(num_steps)
    return list(ds.as_numpy_iterator())


@pytest.mark.parametrize("name,tfl", [("ptm_lm", {"targets": 48}), ("ptm_prefix", {"inputs": 24, "targets": 24})])
def test_batches_equal_seqio_decoder_feature_converter(name, tfl, sp_tok):
    cfg = DataConfig(sources=[SourceConfig(f"seqio:{name}")], seq_len=48, global_batch_size=4, seed=7,
                     num_epochs=2, task_feature_lengths=tfl)
    it, stats = build_train_data(cfg, sp_tok)
    ours = _all(it)
    ref = _seqio_reference(name, tfl, batch=4, seed=7, epochs=2)
    assert len(ours) == len(ref) == stats.num_batches > 5
    for a, b in zip(ours, ref, strict=True):
        assert set(a) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        for k_seqio, k_ptm in KEYS.items():
            np.testing.assert_array_equal(a[k_ptm], b[k_seqio], err_msg=k_ptm)
        assert a["loss_mask"].dtype == np.float32 and a["targets"].dtype == np.int32
    # Independent of seqio: inputs are targets shifted right by one inside each segment, starting with 0.
    b = ours[0]
    for r in range(b["targets"].shape[0]):
        for s in set(b["segment_ids"][r].tolist()) - {0}:
            idx = np.flatnonzero(b["segment_ids"][r] == s)
            assert b["inputs"][r, idx[0]] == 0
            np.testing.assert_array_equal(b["inputs"][r, idx[1:]], b["targets"][r, idx[:-1]])
            np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
            assert b["targets"][r, idx[-1]] == sp_tok.eos_id
            if name == "ptm_prefix":  # loss on targets only: the prefix (inputs + its EOS) carries none
                assert b["loss_mask"][r, idx[0]] == 0 and b["loss_mask"][r, idx[-1]] == 1
            else:
                assert b["loss_mask"][r, idx].all()
    assert stats.examples == (120 if name == "ptm_lm" else 80)
    assert stats.seen(stats.num_batches)["tokens_seen"] == sum(int((x["segment_ids"] > 0).sum()) for x in ours)
    assert stats.loss_tokens == sum(int(x["loss_mask"].sum()) for x in ours)


def test_iterator_state_resumes_at_the_same_batch(sp_tok):
    cfg = DataConfig(sources=[SourceConfig("seqio:ptm_lm")], seq_len=48, global_batch_size=4, seed=1, num_epochs=2)
    full = _all(build_train_data(cfg, sp_tok)[0])
    it, _ = build_train_data(cfg, sp_tok)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert state["batches_done"] == 5
    it2, _ = build_train_data(cfg, sp_tok)
    it2.set_state(state)
    rest = _all(it2)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(DataError, match="seed"):
        build_train_data(dataclasses.replace(cfg, seed=2), sp_tok)[0].set_state(state)


def _segments(batches, tok):
    out = []
    for b in batches:
        for r in range(b["targets"].shape[0]):
            for s in sorted(set(b["segment_ids"][r].tolist()) - {0}):
                out.append(tuple(b["targets"][r][b["segment_ids"][r] == s].tolist()))
    return out


def test_mixture_follows_its_rates(sp_tok):
    cfg = DataConfig(mixture_or_task_name="ptm_mix", seq_len=64, global_batch_size=8, seed=0, num_steps=60)
    it, stats = build_train_data(cfg, sp_tok)
    batches = _all(it)
    assert len(batches) == stats.num_batches == 60
    first = [sp_tok.decode(seg).lstrip()[:1] for seg in _segments(batches, sp_tok)]
    a, b = sum(c in "abcdefgh" for c in first), sum(c in "qrstuvwx" for c in first)
    assert a + b == len(first) > 800
    assert abs(a / len(first) - 0.75) < 0.05, (a, b)
    assert stats.examples == 400 and set(stats.sources) == {"ptm_mix_a", "ptm_mix_b"}


def test_two_hosts_read_disjoint_shards(sp_tok):
    cfg = DataConfig(sources=[SourceConfig("seqio:ptm_lm")], seq_len=48, global_batch_size=4, seed=3, num_epochs=1)
    (it0, st0), (it1, st1) = (build_train_data(cfg, sp_tok, process_index=p, process_count=2) for p in (0, 1))
    # Every document starts with its number ("doc17 ..."): which documents did each host see?
    d0, d1 = ([sp_tok.decode(seg).split()[0] for seg in _segments(_all(it), sp_tok)] for it in (it0, it1))
    assert st0.num_batches == st1.num_batches and st0.to_dict() == st1.to_dict()
    assert d0 and d1 and not set(d0) & set(d1)
    assert len(d0) == len(set(d0)) and len(d1) == len(set(d1))  # one epoch: each document once
    assert set(d0) | set(d1) <= {f"doc{i}" for i in range(120)} and len(d0) + len(d1) >= 100


def test_chat_task_equals_the_same_data_from_jsonl(tmp_path, sp_tok):
    path = write_jsonl(tmp_path / "chat.jsonl", seqio_tasks.chat_records())
    for tok in (ByteTokenizer(), sp_tok):
        base = dict(seq_len=64, global_batch_size=4, seed=3, num_epochs=2)
        it_s, st_s = build_train_data(DataConfig(sources=[SourceConfig("seqio:ptm_chat", name="c")], **base), tok)
        it_j, st_j = build_train_data(DataConfig(sources=[SourceConfig(path, name="c")], **base), tok)
        a, b = _all(it_s), _all(it_j)
        assert len(a) == len(b) == st_s.num_batches == st_j.num_batches
        for x, y in zip(a, b, strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        dj, ds_ = st_j.to_dict(), st_s.to_dict()
        dj["sources"]["c"].pop("path"), ds_["sources"]["c"].pop("path")
        assert ds_ == dj and st_s.examples == 40


def test_chat_task_mixes_with_jsonl_and_rates(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", seqio_tasks.chat_records())
    cfg = DataConfig(sources=[SourceConfig("seqio:ptm_chat", rate=0.5), SourceConfig(path)], seq_len=64,
                     global_batch_size=4)
    _, stats = build_train_data(cfg, ByteTokenizer())
    assert stats.examples == 80 and stats.examples_seen == 60


# --- bad input: each a clear error -----------------------------------------------------------------------------

def _cfg(name, **kw):
    return DataConfig(sources=[SourceConfig(f"seqio:{name}")], seq_len=48, global_batch_size=4, **kw)


def test_unknown_task_lists_the_registered_ones(sp_tok):
    with pytest.raises(ConfigError, match=r"no Task or Mixture named 'ptm_lmm'.*closest: ptm_lm.*ptm_prefix"):
        build_train_data(_cfg("ptm_lmm"), sp_tok)


def test_module_that_fails_to_import(tmp_path, monkeypatch, sp_tok):
    (tmp_path / "broken_tasks.py").write_text("import seqio\nraise RuntimeError('boom in the task module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"seqio module 'broken_tasks' failed to import: RuntimeError: boom"):
        build_train_data(_cfg("ptm_lm", seqio_modules=["broken_tasks"]), sp_tok)
    with pytest.raises(ConfigError, match=r"'no_such_tasks_module' failed to import: ModuleNotFoundError"):
        build_train_data(_cfg("ptm_lm", seqio_modules=["no_such_tasks_module"]), sp_tok)


def test_task_without_the_needed_features(sp_tok):
    with pytest.raises(ConfigError, match=r"ptm_nofeatures: output features \['text'\] have neither 'targets'"):
        build_train_data(_cfg("ptm_nofeatures"), sp_tok)
    with pytest.raises(ConfigError, match="has 'inputs' .prefix-LM.: set DataConfig.task_feature_lengths"):
        build_train_data(_cfg("ptm_prefix"), sp_tok)
    with pytest.raises(ConfigError, match="decoder length 64, but DataConfig.seq_len = 48; set seq_len = 64"):
        build_train_data(_cfg("ptm_prefix", task_feature_lengths={"inputs": 32, "targets": 32}), sp_tok)


def test_vocabulary_mismatch(sp_tok):
    with pytest.raises(ConfigError, match=r"'targets' vocabulary SentencePieceVocabulary \(vocab_size 320, eos_id "
                       r"1\) does not match the run's tokenizer 'byte' \(vocab_size 259, eos_id 258\)"):
        build_train_data(_cfg("ptm_lm"), ByteTokenizer())


def test_cli_errors_exit_non_zero(tmp_path, capsys):
    from ptm.cli import main

    base = ["train", "--gin_file=models/tiny.gin", "--gin_file=meshes/cpu.gin", "--gin_file=runs/t5x_compat.gin",
            f"--gin.train.tokenizer='{seqio_tasks.SPM_PATH}'", "--gin.ModelConfig.vocab_size=320",
            "--gin.DataConfig.seq_len=48", "--gin.BATCH_SIZE=4", f"--run_dir={tmp_path / 'r'}"]
    assert main([*base, "--seqio_module=no_such_tasks_module", "--gin.MIXTURE_OR_TASK_NAME='ptm_lm'"]) == 2
    assert "seqio module 'no_such_tasks_module' failed to import" in capsys.readouterr().err
    assert main([*base, "--gin.MIXTURE_OR_TASK_NAME='nope'"]) == 2
    err = capsys.readouterr().err
    assert "no Task or Mixture named 'nope'" in err and "ptm_lm" in err
    assert main([*base, "--gin.MIXTURE_OR_TASK_NAME='ptm_lm'", "--gin.train.tokenizer='byte'"]) == 2
    assert "does not match the run's tokenizer 'byte'" in capsys.readouterr().err
    assert main([*base, "--gin.MIXTURE_OR_TASK_NAME='ptm_lm'", "--gin.ModelConfig.vocab_size=300"]) == 2
    assert "vocab_size=300 < tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_core_does_not_import_seqio(tmp_path):
    import subprocess

    code = ("import sys, ptm.data.pipeline, ptm.data.tokenizers, ptm.train.loop, ptm.eval.evalset, "
            "ptm.experiment.runner, ptm.config, ptm.cli; "
            "bad = [m for m in ('seqio', 'tensorflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_validation_split_as_eval_items(tmp_path):
    from ptm.data.seqio_source import eval_records
    from ptm.eval.evalset import load_eval_file

    recs = eval_records("seqio:ptm_prefix", "train", scorer="exact_match", max_items=5)
    assert [(r["messages"][0]["content"], r["reference"]) for r in recs] == seqio_tasks.PREFIX_PAIRS[:5]
    items = load_eval_file(write_jsonl(tmp_path / "ev.jsonl", recs))
    assert len(items) == 5 and items[0].scorer == "exact_match"
    assert items[0].reference == seqio_tasks.PREFIX_PAIRS[0][1]
    ppl = eval_records("seqio:ptm_lm", "validation", scorer="perplexity", max_items=3)
    assert [r["reference"] for r in ppl] == seqio_tasks.LM_DOCS[:3] and ppl[0]["messages"] == []


def test_config_mixture_or_task_name_and_num_steps(tmp_path):
    cfg = DataConfig(mixture_or_task_name="ptm_lm")
    assert cfg.sources == [SourceConfig("seqio:ptm_lm")]
    assert dataclasses.replace(cfg, seed=1).sources == cfg.sources
    with pytest.raises(ConfigError, match="not both"):
        DataConfig(mixture_or_task_name="ptm_lm", sources=[SourceConfig("a.jsonl")])
    path = write_jsonl(tmp_path / "c.jsonl", seqio_tasks.chat_records(4))
    with pytest.raises(ConfigError, match="num_steps applies to seqio LM sources only"):
        build_train_data(DataConfig(sources=[SourceConfig(path)], num_steps=3), ByteTokenizer())
