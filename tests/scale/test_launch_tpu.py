"""tools/launch_tpu.py: the gcloud commands it prints (--dry-run); its preemption loop on a fake gcloud."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "launch_tpu.py"


def _dry(*args: str) -> list[str]:
    p = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [ln[2:] for ln in p.stdout.splitlines() if ln.startswith("+ ")]


def _verbs(lines: list[str]) -> list[str]:
    return [ln.split()[4] for ln in lines]


def test_dry_run_fresh_slice_creates_installs_and_runs_everywhere():
    lines = _dry(
        "run",
        "--name",
        "ptm-7b",
        "--zone",
        "europe-west4-a",
        "--project",
        "proj",
        "--accelerator",
        "v3-128",
        "--spot",
        "--dry-run",
        "--env",
        "XLA_FLAGS=--xla_x",
        "--",
        "ptm",
        "train",
        "--gin_file=runs/paper_7b_skill.gin",
        "--run_dir=gs://bkt/runs/sci",
    )
    assert _verbs(lines) == ["describe", "create", "describe", "scp", "ssh", "ssh"]
    create = lines[1]
    for flag in (
        "ptm-7b",
        "--zone=europe-west4-a",
        "--project=proj",
        "--accelerator-type=v3-128",
        "--spot",
        "--version=tpu-ubuntu2204-base",
    ):
        assert flag in create.split()
    assert "--worker=all" in lines[3] and "ptm-7b:~/ptm-src.tar.gz" in lines[3]
    assert "jax[tpu]==0.10.2" in lines[4] and "--worker=all" in lines[4]
    job = lines[5]
    assert "--worker=all" in job and "~/ptm-venv/bin/ptm train --gin_file=runs/paper_7b_skill.gin" in job
    assert "--run_dir=gs://bkt/runs/sci" in job and "XLA_FLAGS=--xla_x" in job and "tee -a ~/ptm-logs/" in job


def test_dry_run_ready_and_installed_slice_only_runs():
    lines = _dry(
        "run",
        "--name",
        "t",
        "--zone",
        "z",
        "--dry-run",
        "--assume-state",
        "READY",
        "--assume-installed",
        "--worker",
        "0",
        "--",
        "ptm",
        "merge",
        "configs/merges/x.toml",
    )
    assert _verbs(lines) == ["describe", "ssh", "ssh"]
    assert "test -f ~/ptm-venv/.ptm-installed" in lines[1]
    assert "--worker=0" in lines[2] and "ptm merge configs/merges/x.toml" in lines[2]


def test_dry_run_preempted_slice_is_recreated():
    lines = _dry(
        "run",
        "--name",
        "t",
        "--zone",
        "z",
        "--dry-run",
        "--assume-state",
        "PREEMPTED",
        "--",
        "ptm",
        "train",
        "--gin_file=a.gin",
    )
    assert _verbs(lines) == ["describe", "delete", "describe", "create", "describe", "scp", "ssh", "ssh"]


FAKE_GCLOUD = r'''#!{python}
"""A stand-in for gcloud's TPU VM commands: state in files, each call logged."""
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
a = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(a) + "\n")
state_f, inst_f, runs_f = (os.path.join(d, n) for n in ("state", "installed", "runs.json"))
verb = a[3]
if verb == "describe":
    if not os.path.exists(state_f):
        sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found\n")
        sys.exit(1)
    print(open(state_f).read())
elif verb == "create":
    open(state_f, "w").write("READY")
elif verb == "delete":
    os.remove(state_f)
    if os.path.exists(inst_f):
        os.remove(inst_f)
elif verb == "scp":
    import tarfile
    names = tarfile.open(a[4]).getnames()
    assert "ptm/parallel/distributed.py" in names and "ptm/gin/meshes/v3-128.gin" in names, names[:20]
    assert not any("__pycache__" in n for n in names)
elif verb == "ssh":
    cmd = [x for x in a if x.startswith("--command=")][0][len("--command="):]
    if cmd.startswith("test -f"):
        sys.exit(0 if os.path.exists(inst_f) else 1)
    if "pip install" in cmd:
        open(inst_f, "w").write("1")
        print("installed")
    elif "ptm-logs" in cmd:
        runs = json.load(open(runs_f))
        outcome = runs.pop(0)
        json.dump(runs, open(runs_f, "w"))
        print(f"worker 0: step 100 ({{outcome}})")
        if outcome == "preempt":
            open(state_f, "w").write("PREEMPTED")
            sys.exit(255)
        sys.exit(0 if outcome == "ok" else 1)
'''


def _fake_gcloud(tmp_path: Path, runs: list[str]) -> tuple[Path, dict]:
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    return gcloud, {**os.environ, "FAKE_GCLOUD_DIR": str(tmp_path)}


def _calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(ln) for ln in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _run(gcloud: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`launch_tpu.py run --name t --zone z ARGS -- ptm train ...` against the fake gcloud."""
    cmd = [sys.executable, str(TOOL), "run", "--name", "t", "--zone", "z", "--gcloud", str(gcloud), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_preempted_run_is_recreated_reinstalled_and_rerun(tmp_path):
    gcloud, env = _fake_gcloud(tmp_path, ["preempt", "preempt", "ok"])
    log = tmp_path / "job.log"
    p = _run(gcloud, env, "--poll", "0", "--log", str(log), "--", "ptm", "train", "--gin_file=runs/x.gin")
    assert p.returncode == 0, p.stderr
    verbs = [c[3] for c in _calls(tmp_path)]
    assert verbs.count("create") == 3 and verbs.count("delete") == 2 and verbs.count("scp") == 3
    jobs = [c for c in _calls(tmp_path) if c[3] == "ssh" and "ptm-logs" in c[-1]]
    assert len(jobs) == 3 and len({json.dumps(j) for j in jobs}) == 1  # the very same command each time
    assert log.read_text().count("worker 0: step 100") == 3
    assert "restart 2/20" in p.stderr


def test_failure_on_healthy_slice_is_not_retried(tmp_path):
    gcloud, env = _fake_gcloud(tmp_path, ["fail", "ok"])
    p = _run(gcloud, env, "--", "ptm", "train")
    assert p.returncode == 1
    assert "not retrying" in p.stderr
    assert len([c for c in _calls(tmp_path) if c[3] == "ssh" and "ptm-logs" in c[-1]]) == 1


def test_source_tarball_has_code_and_gin_files(tmp_path):
    sys.path.insert(0, str(TOOL.parent))
    try:
        import launch_tpu
    finally:
        sys.path.pop(0)
    tar = launch_tpu.make_source_tarball(str(tmp_path / "src.tar.gz"))
    names = tarfile.open(tar).getnames()
    assert "pyproject.toml" in names and "ptm/cli.py" in names and "ptm/gin/meshes/v3-32.gin" in names
    assert not any(".venv" in n or "__pycache__" in n for n in names)


def test_dry_run_prints_every_workers_spmd_command():
    p = subprocess.run(
        [sys.executable, str(TOOL), "run", "--name", "t", "--zone", "z", "--accelerator", "v3-32", "--dry-run",
         "--assume-state", "READY", "--assume-installed", "--", "ptm", "experiment",
         "configs/experiments/full.toml", "--results-dir", "/mnt/shared/full"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    workers = [ln for ln in p.stdout.splitlines() if ln.startswith("worker ")]
    assert [ln.split(":")[0] for ln in workers] == [f"worker {i}/4" for i in range(4)]
    cmds = {ln.split(": ", 1)[1] for ln in workers}
    assert len(cmds) == 1 and "~/ptm-venv/bin/ptm experiment configs/experiments/full.toml" in cmds.pop()
    assert "--worker=all" in [ln for ln in p.stdout.splitlines() if ln.startswith("+ ")][-1]


def test_spmd_command_on_one_worker_of_a_multihost_slice_is_refused():
    p = subprocess.run(
        [sys.executable, str(TOOL), "run", "--name", "t", "--zone", "z", "--accelerator", "v3-128", "--dry-run",
         "--worker", "0", "--", "ptm", "eval", "ckpt", "--suite", "s"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode != 0 and "--worker=all" in p.stderr


def test_hosts_of_slice_types():
    sys.path.insert(0, str(TOOL.parent))
    import launch_tpu

    assert [launch_tpu.hosts_of(a) for a in ("v3-8", "v3-32", "v3-128", "v4-16", "v5litepod-8", "v5litepod-16")] \
        == [1, 4, 16, 2, 1, 4]
