"""Every command the README shows works as shown (at toy scale), so the README cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ptm.cli import build_parser, main
from tests.merge.conftest import random_tree, save_orbax

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _code_commands() -> list[str]:
    """Commands of the README's ```bash blocks: continuation lines joined, `&&` chains split."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            cmds += [c.strip() for c in line.split("&&") if c.strip() and not c.strip().startswith("#")]
    return cmds


def _table_commands() -> list[str]:
    return [m for m in re.findall(r"^\| `([^`]+)`", README, re.M)]


def test_readme_shows_the_install_default_job_and_test_commands():
    cmds = _code_commands()
    assert 'pip install -e ".[test]"' in cmds
    assert "ptm experiment configs/experiments/quick.toml" in cmds
    test_cmd = next(c for c in cmds if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), f".ci/run must run the README's test command {test_cmd!r}"


def test_default_job_command_is_valid(capsys):
    """The default job's config parses and plans (running it is tests/experiment/test_micro_e2e's job)."""
    (cmd,) = [c for c in _code_commands() if c.startswith("ptm experiment")]
    assert main([*shlex.split(cmd)[1:], "--check"]) == 0
    assert "train general" in capsys.readouterr().out


def test_readme_merge_example_runs(tmp_path, monkeypatch):
    """The PTM sweep example, on tiny checkpoints laid out as the example names them."""
    (cmd,) = [c for c in _code_commands() if c.startswith("ptm merge")]
    args = shlex.split(cmd)
    for i, a in enumerate(args):
        if a in ("--pre", "--general", "--skill"):
            save_orbax(tmp_path / args[i + 1], random_tree({"--pre": 0, "--general": 1, "--skill": 2}[a]))
    monkeypatch.chdir(tmp_path)
    assert main(args[1:] + ["--no-progress"]) == 0
    omegas = args[args.index("--sweep") + 1].split(",")
    out = args[args.index("--out") + 1]
    for w in omegas:
        assert (tmp_path / out.format(omega=float(w)) / "params" / "_METADATA").exists()


@pytest.mark.parametrize("cmd", _table_commands())
def test_command_table_entries_exist(cmd):
    """Each row of the command table names a real subcommand (or a runnable module)."""
    words = cmd.split()
    if words[0] == "python":
        mod = words[words.index("-m") + 1]
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return
    assert words[0] == "ptm"
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    assert words[1] in sub, f"README names `ptm {words[1]}`, which does not exist"
    nested = [w for w in words[2:] if re.fullmatch(r"[a-z][a-z-]+", w)]
    if nested and sub[words[1]]._subparsers is not None:
        choices = sub[words[1]]._subparsers._group_actions[0].choices
        assert nested[0] in choices, f"README names `ptm {words[1]} {nested[0]}`, which does not exist"
