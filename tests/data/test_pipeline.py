from __future__ import annotations

from collections import Counter

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from datahelpers import conv, write_jsonl

from ptm.data.chat import encode_chat
from ptm.data.pipeline import DataConfig, SourceConfig, build_eval_batches, build_train_data
from ptm.data.sources import read_examples
from ptm.data.tokenizers import ByteTokenizer
from ptm.errors import ConfigError, DataError

TOK = ByteTokenizer()
KEYS = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
        "positions": np.int32}


def make_source(tmp_path, name: str, n: int, seed: int = 0, max_len: int = 40) -> str:
    """n conversations of 37..~110 byte tokens: none is over-long at seq_len=128."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    recs = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(1, max_len // 6 + 2)))
        a = " ".join(rng.choice(words, rng.integers(1, max_len // 6 + 2)))
        recs.append(conv(f"{name}{i} {q}", a))
    return write_jsonl(tmp_path / f"{name}.jsonl", recs)


def expected_examples(path: str) -> list[tuple]:
    out = []
    for ex in read_examples(path):
        ids, mask = encode_chat(ex.messages, TOK)
        out.append((tuple(ids.tolist()), tuple(mask.tolist())))
    return out


def all_batches(config, **kw):
    it, stats = build_train_data(config, TOK, **kw)
    return list(it), stats


def segments(batch):
    """(row, slice, ids, mask) per packed example; ids/mask rebuilt from the shifted inputs/targets."""
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            sl = slice(idx[0], idx[-1] + 1)
            assert len(idx) == idx[-1] - idx[0] + 1, "a segment must be contiguous"
            ids = tuple(batch["inputs"][r, sl].tolist()) + (int(batch["targets"][r, idx[-1]]),)
            mask = (0,) + tuple(int(x) for x in batch["loss_mask"][r, sl])
            yield r, sl, ids, mask


def test_packing_contract_no_cross_example_targets_or_attention(tmp_path):
    path = make_source(tmp_path, "g", 60)
    cfg = DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=4, num_epochs=2)
    batches, stats = all_batches(cfg)
    assert len(batches) == stats.num_batches > 1
    got = Counter()
    for b in batches:
        assert set(b) == set(KEYS)
        for k, dt in KEYS.items():
            assert b[k].dtype == dt and b[k].shape == (4, 128)
        for r, sl, ids, mask in segments(b):
            assert b["positions"][r, sl].tolist() == list(range(sl.stop - sl.start))  # restart at 0
            # Within an example, each target is the next input: the shift never crosses into a neighbour.
            assert (b["targets"][r, sl][:-1] == b["inputs"][r, sl][1:]).all()
            got[(ids, mask)] += 1
        pad = b["segment_ids"] == 0
        assert not b["loss_mask"][pad].any() and not b["positions"][pad].any()
        for r in range(4):  # padding only at the end of a row; segment ids count up from 1
            seg = b["segment_ids"][r]
            nz = seg[seg > 0]
            assert (seg[: len(nz)] > 0).all() and (np.diff(nz) >= 0).all() and (nz.size == 0 or nz[0] == 1)
            assert set(np.diff(nz).tolist()) <= {0, 1}
        # Attention mask from segment_ids vs. example identity derived independently from positions.
        for r in range(4):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            ex = np.cumsum((pos == 0) & (seg > 0)) * (seg > 0)
            causal = np.tril(np.ones((128, 128), bool))
            attn = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & causal
            reference = (ex[:, None] == ex[None, :]) & (ex[:, None] > 0) & causal
            assert (attn == reference).all()
            assert not (attn & (ex[:, None] != ex[None, :])).any()
    # Every example appears exactly num_epochs times, bit-identical to its chat encoding (mask shifted).
    assert got == Counter({e: 2 for e in expected_examples(path)})
    assert stats.examples == 60 and stats.examples_seen == 120
    assert stats.tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert stats.loss_tokens == sum(int(b["loss_mask"].sum()) for b in batches)
    assert stats.packed_rows < 120  # packing actually packs
    assert stats.padding_rows == stats.num_batches * 4 - stats.packed_rows


def test_seen_counts_match_batches_and_last_batch_padded(tmp_path):
    path = make_source(tmp_path, "g", 23)
    cfg = DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=4, pack=False)
    batches, stats = all_batches(cfg)
    assert stats.packed_rows == 23 and stats.num_batches == 6 and stats.padding_rows == 1
    assert (batches[-1]["segment_ids"][3] == 0).all() and (batches[-1]["segment_ids"][2] > 0).any()
    ex = tok = lt = 0
    for k, b in enumerate(batches, 1):
        ex += sum(1 for _ in segments(b))
        tok += int((b["segment_ids"] > 0).sum())
        lt += int(b["loss_mask"].sum())
        assert stats.seen(k) == {"examples_seen": ex, "tokens_seen": tok, "loss_tokens_seen": lt}
    assert stats.seen(0) == {"examples_seen": 0, "tokens_seen": 0, "loss_tokens_seen": 0}
    d = stats.to_dict()
    assert d["num_batches"] == 6 and 0 < d["packing_efficiency"] <= 1 and "_cum" not in d


def test_skipped_examples_are_counted(tmp_path):
    recs = [conv(f"q{i}", f"a{i}") for i in range(8)]
    for i in (1, 4, 6):
        recs[i] = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"u{i}"}]}
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    batches, stats = all_batches(DataConfig(sources=[SourceConfig(path)], seq_len=64, global_batch_size=2))
    assert stats.skipped == 3 and stats.examples == 5
    assert sum(1 for b in batches for _ in segments(b)) == 5


def test_truncate_vs_drop(tmp_path):
    seq = 48
    recs = [conv(f"q{i}", "short") for i in range(6)]
    recs += [conv("q", "a long reply " * 10) for _ in range(3)]  # over-long; reply starts early: truncatable
    recs += [conv("a very long question " * 5, "late reply")]  # over-long; reply starts beyond seq_len
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    lengths = [len(encode_chat(r["messages"], TOK)[0]) for r in recs]
    assert sum(n > seq + 1 for n in lengths) == 4

    batches, st = all_batches(DataConfig(sources=[SourceConfig(path)], seq_len=seq, global_batch_size=2))
    assert (st.truncated, st.dropped, st.examples) == (3, 1, 9)
    full = [(ids, mask) for b in batches for _, sl, ids, mask in segments(b) if sl.stop - sl.start == seq]
    long_ids, long_mask = encode_chat(recs[6]["messages"], TOK)
    # The 3 truncated examples fill whole rows and are the first seq_len + 1 tokens of the original.
    assert full == [(tuple(long_ids[: seq + 1].tolist()), tuple(long_mask[: seq + 1].tolist()))] * 3

    batches, st = all_batches(DataConfig(sources=[SourceConfig(path)], seq_len=seq, global_batch_size=2,
                                         overlong="drop"))
    assert (st.truncated, st.dropped, st.examples) == (0, 4, 6)
    assert sum(1 for b in batches for _ in segments(b)) == 6


def test_determinism_and_seed(tmp_path):
    path = make_source(tmp_path, "g", 50)
    cfg = DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=2, seed=7)
    a, _ = all_batches(cfg)
    b, _ = all_batches(cfg)
    c, _ = all_batches(DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=2, seed=8))
    assert all((x[k] == y[k]).all() for x, y in zip(a, b, strict=True) for k in KEYS)

    def order(bs):
        return [ids for bt in bs for _, _, ids, _ in segments(bt)]

    assert order(a) != order(c) and Counter(order(a)) == Counter(order(c))
    # Epochs are shuffled differently from each other.
    two, _ = all_batches(DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=2, seed=7,
                                    num_epochs=2, pack=False))
    o = order(two)
    assert o[:50] != o[50:] and Counter(o[:50]) == Counter(o[50:])


def test_no_shuffle_keeps_file_order(tmp_path):
    path = make_source(tmp_path, "g", 12)
    cfg = DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=3, shuffle=False,
                     pack=False)
    batches, _ = all_batches(cfg)
    assert [ids for b in batches for _, _, ids, _ in segments(b)] == [e[0] for e in expected_examples(path)]


def test_nested_subsets(tmp_path):
    path = make_source(tmp_path, "d", 300)

    def subset(n, seed=0, subset_seed=0):
        cfg = DataConfig(sources=[SourceConfig(path, max_examples=n, subset_seed=subset_seed)], seq_len=128,
                         global_batch_size=4, seed=seed)
        bs, st = all_batches(cfg)
        assert st.examples == n
        return {ids for b in bs for _, _, ids, _ in segments(b)}

    s100, s200 = subset(100), subset(200)
    assert len(s100) == 100 and len(s200) == 200 and s100 < s200
    assert subset(100, seed=5) == s100  # the training seed does not change which examples form D_100
    assert subset(100, subset_seed=1) != s100
    with pytest.raises(DataError, match="max_examples=301 but the source has only 300"):
        subset(301)


def test_mixture_counts(tmp_path):
    g, d = make_source(tmp_path, "G", 30), make_source(tmp_path, "D", 10, 1)
    e = make_source(tmp_path, "E", 20, 2)
    cfg = DataConfig(sources=[SourceConfig(g, name="general"), SourceConfig(d, epochs=2),
                              SourceConfig(e, rate=0.5)], seq_len=128, global_batch_size=4, num_epochs=2)
    batches, st = all_batches(cfg)
    assert st.examples == 60 and st.examples_seen == 2 * (30 + 20 + 10)
    assert set(st.sources) == {"general", "D.jsonl", "E.jsonl"}
    per_epoch_rows = [Counter(), Counter()]
    seen_e = [set(), set()]
    # Rows come epoch by epoch; find the epoch boundary from the cumulative example count.
    k = 0
    for b in batches:
        for _, _, ids, _ in segments(b):
            text = TOK.decode(ids)
            src = text[text.index("<|user|>\n") + 9]
            epoch = 0 if k < 60 else 1
            per_epoch_rows[epoch][src] += 1
            if src == "E":
                seen_e[epoch].add(ids)
            k += 1
    assert per_epoch_rows == [Counter({"G": 30, "D": 20, "E": 10})] * 2
    assert all(len(s) == 10 for s in seen_e) and seen_e[0] != seen_e[1]  # a fresh half each epoch
    # CFT: D alone.
    _, cft = all_batches(DataConfig(sources=[SourceConfig(d)], seq_len=128, global_batch_size=4))
    assert cft.examples == cft.examples_seen == 10


def test_per_host_sharding(tmp_path):
    path = make_source(tmp_path, "g", 45)
    cfg = DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=4)
    full, st = all_batches(cfg)
    p0, st0 = all_batches(cfg, process_index=0, process_count=2)
    p1, _ = all_batches(cfg, process_index=1, process_count=2)
    assert len(full) == len(p0) == len(p1) == st.num_batches == st0.num_batches
    for f, a, b in zip(full, p0, p1, strict=True):
        assert a["inputs"].shape == (2, 128)
        for k in KEYS:
            assert (np.concatenate([a[k], b[k]]) == f[k]).all()
    with pytest.raises(ConfigError, match="not divisible"):
        build_train_data(cfg, TOK, process_index=0, process_count=3)


def test_checkpoint_restore_mid_epoch_replays_identical_batches(tmp_path):
    path = make_source(tmp_path, "g", 60)
    cfg = DataConfig(sources=[SourceConfig(path)], seq_len=128, global_batch_size=2, num_epochs=2)
    it, st = build_train_data(cfg, TOK)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    after = [next(it) for _ in range(st.num_batches - 5)]
    with pytest.raises(StopIteration):
        next(it)

    fresh, _ = build_train_data(cfg, TOK)  # a new process: rebuild, then restore in place
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 5
        mngr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    replay = list(fresh)
    assert len(replay) == len(after)
    assert all((x[k] == y[k]).all() for x, y in zip(after, replay, strict=True) for k in KEYS)


def test_eval_batches_fixed_order(tmp_path):
    path = make_source(tmp_path, "v", 17)
    cfg = DataConfig(sources=[SourceConfig(path, epochs=3)], seq_len=128, global_batch_size=4, seed=3,
                     num_epochs=4)
    a, st = build_eval_batches(cfg, TOK)
    b, _ = build_eval_batches(DataConfig(**{**cfg.__dict__, "seed": 9}), TOK)
    assert st.examples_seen == 17
    assert all((x[k] == y[k]).all() for x, y in zip(a, b, strict=True) for k in KEYS)
    got = [ids for bt in a for _, _, ids, _ in segments(bt)]
    assert Counter(got) == Counter(e[0] for e in expected_examples(path))


@pytest.mark.parametrize("bad,match", [
    ({"overlong": "wrap"}, "overlong"),
    ({"seq_len": 0}, "seq_len"),
    ({"global_batch_size": 0}, "global_batch_size"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"sources": []}, "sources is empty"),
])
def test_config_errors(tmp_path, bad, match):
    path = make_source(tmp_path, "g", 3)
    cfg = DataConfig(**{"sources": [SourceConfig(path)], "seq_len": 64, "global_batch_size": 2, **bad})
    with pytest.raises(ConfigError, match=match):
        build_train_data(cfg, TOK)
