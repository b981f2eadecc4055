"""Issue 12, item 12: a byte that is not UTF-8, far into a JSONL file, is reported as file:line (1-based) — not as
an offset into a decoding buffer — locally and on gs://."""

from __future__ import annotations

import json
import re

import pytest
from datahelpers import conv
from etils import epath

from ptm.data.sources import read_examples
from ptm.errors import DataError

N, BAD = 5000, 4001  # far beyond any read buffer (8 KiB text buffers, gcsfs blocks)


def _lines_with_bad_byte() -> bytes:
    lines = [json.dumps(conv(f"question {i}", f"answer {i}")).encode() for i in range(N)]
    lines[BAD - 1] = lines[BAD - 1].replace(b"question", b"ques\xfftion")
    return b"\n".join(lines) + b"\n"


def test_non_utf8_byte_on_a_late_line_names_file_and_line(tmp_path):
    f = tmp_path / "train.jsonl"
    raw = _lines_with_bad_byte()
    f.write_bytes(raw)
    col = raw.split(b"\n")[BAD - 1].index(b"\xff") + 1
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:{BAD}: not UTF-8 text: byte 0xff at byte {col} of"):
        read_examples(str(f))


def test_non_utf8_byte_in_a_directory_source(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps(conv("q", "a")) + "\n")
    (tmp_path / "d" / "b.jsonl").write_bytes(b"\n\n" + b'{"messages": "\xc3("}\n')  # bad continuation byte
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'd' / 'b.jsonl'))}:3: not UTF-8 text"):
        read_examples(str(tmp_path / "d"))


def test_crlf_and_utf8_text_still_read_with_line_numbers(tmp_path):
    f = tmp_path / "crlf.jsonl"
    f.write_bytes(b"\r\n".join(json.dumps(conv(f"caf\u00e9 {i}", "\u2028 ok"), ensure_ascii=False).encode()
                               for i in range(3)) + b"\r\n\r\n" + b"{oops\r\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(f))}:5: malformed JSON"):
        read_examples(str(f))
    f.write_bytes(f.read_bytes().replace(b"{oops\r\n", b""))
    exs = read_examples(str(f))
    assert [e.messages[0]["content"] for e in exs] == [f"caf\u00e9 {i}" for i in range(3)]
    assert exs[1].messages[1]["content"] == "\u2028 ok" and exs[2].where == f"{f}:3"


@pytest.mark.gcs
def test_non_utf8_byte_on_gcs_names_file_and_line(gcs_bucket):
    p = f"{gcs_bucket}/data/train.jsonl"
    epath.Path(p).write_bytes(_lines_with_bad_byte())
    with pytest.raises(DataError, match=rf"^{re.escape(p)}:{BAD}: not UTF-8 text: byte 0xff"):
        read_examples(p)
