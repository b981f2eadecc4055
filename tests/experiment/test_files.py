"""The results dir's I/O layer (ptm.experiment.files), local and on gs:// through the real GCS emulator."""

from __future__ import annotations

import json

import gcsfs
import pytest

from ptm.errors import ConfigError
from ptm.experiment import files
from ptm.parallel import sync


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "results")
    return request.getfixturevalue("gcs_bucket") + "/results"


def test_json_round_trip_and_clear_errors(root):
    p = files.join(root, "scores", "validation", "m.json")
    assert not files.exists(p) and files.try_json(p) is None
    with pytest.raises(ConfigError, match="m.json: unreadable"):
        files.read_json(p)
    files.makedirs(files.join(root, "scores"))
    files.write_json(p, {"a": 1})
    assert files.exists(p) and files.read_json(p) == {"a": 1} == files.try_json(p)
    files.write_bytes(files.join(root, "x.png"), b"\x89PNG")
    assert files.names(files.join(root, "scores", "validation"), "*.json") == ["m.json"]
    assert sorted(files.names(root)) == ["scores", "x.png"]
    if not root.startswith("gs://"):  # write-then-rename leaves no temporary file
        assert [q.name for q in __import__("pathlib").Path(root, "scores", "validation").iterdir()] == ["m.json"]


def test_a_file_another_writer_adds_after_a_listing_is_seen(gcs_bucket):
    """gcsfs caches listings: a score written by another host after this one listed the dir must still be found."""
    d = files.join(gcs_bucket, "scores")
    files.write_json(files.join(d, "a.json"), {"n": 1})
    assert files.names(d) == ["a.json"]  # this process now holds a cached listing of d
    other = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
    other.pipe(f"{d[len('gs://'):]}/b.json", json.dumps({"n": 2}).encode())
    assert files.exists(files.join(d, "b.json")) and files.read_json(files.join(d, "b.json")) == {"n": 2}
    assert files.names(d) == ["a.json", "b.json"]


def test_only_process_0_writes(root, monkeypatch):
    monkeypatch.setattr(sync, "is_writer", lambda: False)
    files.makedirs(root)
    files.write_json(files.join(root, "m.json"), {"a": 1})
    files.write_text(files.join(root, "t.md"), "x")
    assert files.names(root) == [] and not files.exists(files.join(root, "m.json"))


def test_put_tree_writes_its_completion_file_last(tmp_path, gcs_bucket, monkeypatch):
    src = tmp_path / "tree"
    (src / "eval").mkdir(parents=True)
    for rel in ("a.jsonl", "eval/b.jsonl", "manifest.json"):
        (src / rel).write_text(rel)
    order = []
    real = files.write_bytes
    monkeypatch.setattr(files, "write_bytes", lambda p, d: (order.append(p), real(p, d)))
    files.put_tree(str(src), f"{gcs_bucket}/suite", last="manifest.json")
    assert order[-1] == f"{gcs_bucket}/suite/manifest.json" and len(order) == 3
    assert files.read_text(f"{gcs_bucket}/suite/eval/b.jsonl") == "eval/b.jsonl"


def test_toy_suite_on_gcs_is_uploaded_once_and_a_different_one_refused(gcs_bucket):
    from ptm.errors import DataError
    from ptm.experiment.runner import _generate_suite

    sizes = {"pretrain": 64, "general": 48, "science": 16, "safety": 16, "coding": 16, "eval": 1}  # micro
    out = f"{gcs_bucket}/suite"
    _generate_suite(out, seed=0, sizes=sizes)
    manifest = files.read_json(files.join(out, "manifest.json"))
    assert all(files.exists(files.join(out, rel)) for rel in manifest["files"])
    fs = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
    stamp = fs.info(f"{out[len('gs://'):]}/manifest.json")["generation"]
    _generate_suite(out, seed=0, sizes=sizes)  # intact: kept, not rewritten
    assert fs.info(f"{out[len('gs://'):]}/manifest.json")["generation"] == stamp
    with pytest.raises(DataError, match="holds another toy suite"):
        _generate_suite(out, seed=1, sizes=sizes)
