"""`ptm search build-pool`: the toy pool is real training runs on the generated suite, reusable on rerun."""

from __future__ import annotations

import json

import pytest

from ptm.ckpt import format as ckpt_format
from ptm.errors import ConfigError
from ptm.toy import suite as toy
from ptm.toy.pool import build_pool, load_pool_config

POOL = f"""
tokenizer = "{toy.TOKENIZER_FILE}"
[suite]
seed = 0
sizes = {{ pretrain = 40, general = 30, science = 12, safety = 12, coding = 12, eval = 2 }}
[model]
vocab_size = {toy.TOKENIZER_VOCAB}
embed_dim = 32
num_layers = 1
num_heads = 2
num_kv_heads = 1
head_dim = 16
mlp_dim = 64
max_seq_len = 64
dtype = "float32"
[train]
seq_len = 64
global_batch_size = 64
[base]
sources = [{{ path = "pretrain.jsonl" }}]
[[member]]
name = "general"
sources = [{{ path = "general.jsonl" }}]
[[member]]
name = "general_then_coding"
init = "general"
sources = [{{ path = "coding.jsonl" }}]
learning_rate = 1e-3
"""


def test_build_pool_trains_members_with_the_suite_tokenizer_and_reuses_them(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "pool.toml"
    cfg.write_text(POOL)
    out = tmp_path / "pool"
    pool = build_pool(str(cfg), str(out))
    assert pool["members"] == [str(out / "runs" / "general"), str(out / "runs" / "general_then_coding")]
    assert json.loads((out / "pool.json").read_text())["members"] == pool["members"]
    assert pool["runs"]["general_then_coding"]["init_from"] == str(out / "runs" / "general")
    for name in ("base", "general", "general_then_coding"):
        meta = ckpt_format.resolve(str(out / "runs" / name)).meta
        assert meta["tokenizer"] == str(out / "suite" / toy.TOKENIZER_FILE)
        assert meta["model"]["vocab_size"] == toy.TOKENIZER_VOCAB
    capsys.readouterr()
    again = build_pool(str(cfg), str(out))
    assert all(r.get("cached") for r in again["runs"].values())
    assert capsys.readouterr().err.count("already trained") == 3
    # SPMD: a process other than 0 writes nothing, not even pool.json (process 0 does, after a barrier)
    from ptm.parallel import sync

    (out / "pool.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.setattr(sync, "is_writer", lambda: False)
    assert build_pool(str(cfg), str(out))["members"] == pool["members"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.replace('init = "general"', 'init = "nobody"'), "not 'base' or an earlier member"),
        (lambda s: s.replace("learning_rate = 1e-3", "lr = 1e-3"), r"unknown key\(s\) \['lr'\]"),
        (lambda s: s.replace("[base]", "[based]"), r"missing \[base\]"),
    ],
)
def test_bad_pool_configs_name_the_file(tmp_path, edit, match):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(edit(POOL))
    with pytest.raises(ConfigError, match=match) as e:
        load_pool_config(str(cfg))
    assert "bad.toml" in str(e.value)


def test_pool_tokenizer_must_be_a_string(tmp_path):
    cfg = tmp_path / "tok.toml"
    cfg.write_text(POOL.replace(f'tokenizer = "{toy.TOKENIZER_FILE}"', "tokenizer = 3"))
    with pytest.raises(ConfigError, match="tokenizer must be a string"):
        build_pool(str(cfg), str(tmp_path / "out"))


def test_pool_model_names_a_preset(tmp_path):
    from ptm.model.config import ModelConfig, from_preset
    from ptm.toy.pool import pool_model

    cfg = load_pool_config("configs/search/toy_pool.toml")
    assert cfg["model"] == "toy_2m"
    model = pool_model(cfg["model"], "toy_pool.toml")
    # the table the file held before it named the preset
    assert model == ModelConfig(vocab_size=1024, embed_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=64, mlp_dim=768, max_seq_len=128, dtype="float32")
    assert pool_model({"preset": "toy_2m", "mlp_dim": 512}, "p.toml") == from_preset("toy_2m", mlp_dim=512)
    with pytest.raises(ConfigError, match=r"p\.toml: bad \[model\]: unknown model preset 'nope'"):
        pool_model("nope", "p.toml")
    with pytest.raises(ConfigError, match=r"p\.toml: bad \[model\]: unknown ModelConfig field"):
        pool_model({"preset": "toy_2m", "width": 3}, "p.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(POOL.replace("[model]", "[model_]"))
    with pytest.raises(ConfigError, match=r"bad\.toml: missing model"):
        load_pool_config(str(bad))
