"""`ptm train` gin handling: the paper's setting is one composition away; bad bindings fail clearly."""

import subprocess
import sys

import pytest

import gin
from ptm import config
from ptm.cli import main
from ptm.errors import ConfigError


def _bound(name):
    value = gin.query_parameter(name)
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        return gin.query_parameter("%" + value.scoped_selector.split("/")[0])  # `%NAME`: resolve the macro
    return value


def test_paper_7b_skill_run_is_one_gin_composition():
    config.parse(["runs/paper_7b_skill.gin"], ["BASE_CKPT = 'gs://b/llama2-7b'", "SKILL_DATA = 'gs://b/sci.jsonl'"])
    assert _bound("ModelConfig.embed_dim") == 4096
    assert _bound("ModelConfig.num_layers") == 32
    assert _bound("ModelConfig.mlp_dim") == 11008
    assert _bound("ModelConfig.vocab_size") == 32000
    assert _bound("ModelConfig.dtype") == "bfloat16"
    assert _bound("DataConfig.seq_len") == 4096
    assert _bound("DataConfig.global_batch_size") == 128
    assert _bound("DataConfig.num_epochs") == 2
    assert _bound("OptimizerConfig.learning_rate") == 2e-5
    assert _bound("OptimizerConfig.warmup_ratio") == 0.03
    assert _bound("train.init_from") == "gs://b/llama2-7b"
    assert _bound("skill/SourceConfig.path") == "gs://b/sci.jsonl"
    # The TPU v3-128 mesh: 128 devices, one 4096-token sequence each, no accumulation needed.
    sizes = [_bound(f"MeshConfig.{a}") for a in ("data", "fsdp", "tensor")]
    assert sizes[0] * sizes[1] * sizes[2] == 128
    assert _bound("train.grad_accum_steps") == 1


@pytest.mark.parametrize("kind", ["sft", "skill", "cft", "rt", "pretrain"])
def test_every_run_kind_composes_with_the_tiny_model(kind):
    macros = ["GENERAL_DATA = 'g.jsonl'", "SKILL_DATA = 's.jsonl'", "PRETRAIN_DATA = 'p.jsonl'",
              "BASE_CKPT = 'pre'", "INSTRUCT_CKPT = 'gen'"]
    config.parse(["models/tiny.gin", "meshes/cpu.gin", f"runs/{kind}.gin", "runs/toy.gin"], macros)
    assert _bound("DataConfig.seq_len") == 256  # toy.gin, parsed later, wins over base.gin
    srcs = _bound("DataConfig.sources")
    assert len(srcs) == (2 if kind == "rt" else 1)


def test_a_runs_directory_in_the_working_directory_does_not_break_includes(tmp_path, monkeypatch):
    """Users keep runs in ./runs; gin took it for a Python namespace package named like the `runs/` includes
    of gin/runs/*.gin and crashed (TypeError) instead of searching on."""
    (tmp_path / "runs" / "my_run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    config.parse(["runs/paper_7b_skill.gin"], ["BASE_CKPT = 'b'", "SKILL_DATA = 's.jsonl'"])
    assert _bound("DataConfig.seq_len") == 4096


def test_later_flags_win_over_files():
    config.parse(["models/tiny.gin"], ["ModelConfig.embed_dim = 64"])
    assert _bound("ModelConfig.embed_dim") == 64


def test_unknown_binding_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="No configurable matching 'Foo'"):
        config.parse(["models/tiny.gin"], ["Foo.bar = 1"])
    with pytest.raises(ConfigError, match="nope"):
        config.parse(["models/tiny.gin"], ["ModelConfig.nope = 1"])


def test_missing_gin_file_names_it():
    with pytest.raises(ConfigError, match="gin file 'missing.gin' not found"):
        config.parse(["missing.gin"], [])


def test_cli_exit_code_and_message(capsys):
    assert main(["train", "--gin_file=models/tiny.gin", "--gin.Foo.bar=1", "--run_dir=/tmp/never"]) == 2
    assert "Foo" in capsys.readouterr().err
    assert main(["merge", "--gin.x=1"]) == 2


def test_print_config_in_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "ptm.cli", "train", "--gin_file=models/tiny.gin", "--gin_file=runs/sft.gin",
         "--gin.GENERAL_DATA='g.jsonl'", "--gin.BASE_CKPT=None", "--run_dir=/tmp/x", "--print_config"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ModelConfig.embed_dim = 128" in out.stdout


def test_no_config_hint_names_gin_files_that_exist(capsys):
    """The hint printed without any gin file names files that are really on the search path."""
    import re

    assert main(["train"]) == 2
    err = capsys.readouterr().err
    hinted = re.findall(r"--gin_file=(\S+?\.gin)", err)
    assert hinted, err
    for f in hinted:
        assert any((p / f).is_file() for p in config.search_path()), f"hint names a missing gin file {f}"
