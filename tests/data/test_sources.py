from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datahelpers import conv, write_jsonl
from etils import epath

from ptm.data.pipeline import DataConfig, SourceConfig, build_train_data
from ptm.data.sources import read_examples
from ptm.data.tokenizers import ByteTokenizer, load_tokenizer
from ptm.errors import DataError


def test_jsonl_reads_in_order_and_skips_blank_lines(tmp_path):
    recs = [conv(f"q{i}", f"a{i}") for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", recs[:2] + [""] + recs[2:])
    exs = read_examples(path)
    assert [e.messages for e in exs] == [r["messages"] for r in recs]
    assert exs[2].where == f"{path}:4"  # line numbers count the blank line


@pytest.mark.parametrize("line,pattern", [
    ('{"messages": [', "malformed JSON"),
    ('{"text": "hi"}', "missing 'messages'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string 'content'"),
    ('{"messages": [{"content": "x"}]}', "string 'role'"),
    ('{"messages": ["hi"]}', "must be an object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [conv("a", "b"), conv("c", "d"), line, conv("e", "f")])
    with pytest.raises(DataError, match=rf"{re.escape(path)}:3: .*{pattern}"):
        read_examples(path)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    for name in ("empty.jsonl", "blank.jsonl"):
        with pytest.raises(DataError, match="empty"):
            read_examples(str(tmp_path / name))
    with pytest.raises(DataError, match="not found"):
        read_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no data files"):
        read_examples(str(tmp_path / "sub"))


def test_all_examples_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}] * 3)
    with pytest.raises(DataError, match=rf"{path}: no usable examples \(3 without assistant"):
        build_train_data(DataConfig(sources=[SourceConfig(path)], seq_len=32, global_batch_size=1),
                         ByteTokenizer())


def test_parquet_source_and_directory_and_glob(tmp_path):
    recs = [conv(f"q{i}", f"a{i}", system="s" if i % 2 else None) for i in range(7)]
    pq.write_table(pa.Table.from_pylist(recs[:4]), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", recs[4:])
    (tmp_path / "notes.txt").write_text("ignored")
    got = [e.messages for e in read_examples(str(tmp_path))]
    assert got == [r["messages"] for r in recs]
    assert [e.messages for e in read_examples(str(tmp_path / "*.parquet"))] == got[:4]
    assert read_examples(str(tmp_path / "a.parquet"))[1].where.endswith("a.parquet:row 2")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="c.parquet: Parquet file has no 'messages' column"):
        read_examples(str(tmp_path / "c.parquet"))


@pytest.mark.gcs
def test_gcs_source_and_tokenizer(gcs_bucket, tmp_path, sp_model_path):
    recs = [conv(f"question {i}", f"answer {i}") for i in range(6)]
    local = write_jsonl(tmp_path / "d.jsonl", recs)
    epath.Path(f"{gcs_bucket}/data/d.jsonl").write_text(open(local).read())
    epath.Path(f"{gcs_bucket}/data/bad.jsonl").write_text(json.dumps(recs[0]) + "\n{oops\n")
    epath.Path(f"{gcs_bucket}/tok/tokenizer.model").write_bytes(open(sp_model_path, "rb").read())

    exs = read_examples(f"{gcs_bucket}/data/d.jsonl")
    assert [e.messages for e in exs] == [r["messages"] for r in recs]
    assert exs[0].where == f"{gcs_bucket}/data/d.jsonl:1"
    with pytest.raises(DataError, match=rf"{gcs_bucket}/data/bad.jsonl:2: malformed JSON"):
        read_examples(f"{gcs_bucket}/data/bad.jsonl")

    tok = load_tokenizer(f"{gcs_bucket}/tok")
    assert tok.encode("answer 5") == load_tokenizer(sp_model_path).encode("answer 5")
    cfg = DataConfig(sources=[SourceConfig(f"{gcs_bucket}/data/d.jsonl")], seq_len=64, global_batch_size=2)
    it, stats = build_train_data(cfg, tok)
    assert stats.examples == 6 and len(list(it)) == stats.num_batches
