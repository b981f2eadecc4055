#!/usr/bin/env python
"""Run any ptm command (`train`, `experiment`, `eval`, `search`, `merge`) on a Cloud TPU VM slice with gcloud, as
one SPMD program on every worker, and keep it running through preemptions.

  python tools/launch_tpu.py --name ptm-7b --zone europe-west4-a --accelerator v3-128 --spot \\
      run -- ptm train --gin_file=runs/paper_7b_skill.gin --run_dir=gs://BUCKET/runs/sci ...
  python tools/launch_tpu.py --name ptm-7b --zone europe-west4-a --accelerator v3-128 --spot \\
      run -- ptm experiment configs/experiments/full.toml --results-dir /mnt/shared/results/full

Every ptm command joins the slice's cluster itself (`ptm.parallel.distributed.initialize()`), so every worker
runs the identical command line; `--dry-run` also prints what each worker runs. The relaunch loop covers every
command: `experiment` resumes from its last completed stage (and a training stage from its newest checkpoint),
`search run` from its search log, `train` from its newest checkpoint; `eval` and `merge` simply run again.

`run` makes sure the slice exists and is READY (creating it, or deleting and re-creating it when it was
PREEMPTED/TERMINATED), ships this checkout to every worker and installs it with `jax[tpu]` (once per VM), then
starts the same command on all workers (`--worker=all`) and streams their output here (and to --log). When the
command dies because the slice was preempted it does all of that again: `ptm train` resumes from the newest
complete checkpoint under its gs:// run dir, so the re-run continues where the last checkpoint left off.
A failure on a healthy slice is returned as is (a bug does not fix itself by retrying).

Other actions: `create`, `setup`, `ssh -- CMD` (any command on all workers), `status`, `delete`.
`--dry-run` prints every gcloud command instead of running it (with --assume-state for what `describe` says).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIP = (
    "ptm",  # includes the gin files (ptm/gin)
    "configs",
    "tools",
    "pyproject.toml",
    "README.md",
)  # what workers need from the checkout
REMOTE_SRC = "~/ptm"
REMOTE_VENV = "~/ptm-venv"
REMOTE_READY = "~/ptm-venv/.ptm-installed"
GONE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")


# ptm commands that are one SPMD program: on a multi-host slice they must run on every worker (a lone worker
# would wait for the others forever in jax.distributed.initialize()).
SPMD_COMMANDS = ("train", "experiment", "eval", "search", "merge")


def hosts_of(accelerator: str) -> int:
    """Workers (hosts) of a TPU slice type: v2/v3/v4/v5p-N count TensorCores, 8 per host; v5litepod/v5e/v6e-N
    count chips, 4 per host on multi-host slices (up to 8 chips fit one host)."""
    kind, _, n = accelerator.rpartition("-")
    try:
        size = int(n)
    except ValueError:
        return 1
    if kind.startswith(("v5litepod", "v5e", "v6e")):
        return 1 if size <= 8 else size // 4
    return max(1, size // 8)


def ptm_subcommand(argv: Sequence[str]) -> str | None:
    argv = list(argv)
    if len(argv) >= 2 and os.path.basename(argv[0]) == "ptm":
        return argv[1]
    if len(argv) >= 4 and argv[1:3] == ["-m", "ptm.cli"]:
        return argv[3]
    return None


def check_spmd(argv: Sequence[str], worker: str, accelerator: str) -> None:
    sub = ptm_subcommand(argv)
    if sub in SPMD_COMMANDS and worker != "all" and hosts_of(accelerator) > 1:
        raise SystemExit(
            f"launch_tpu: `ptm {sub}` is one SPMD program over all {hosts_of(accelerator)} workers of a "
            f"{accelerator}; run it with --worker=all (a single worker would wait for the others forever)"
        )


def per_worker_commands(argv: Sequence[str], env: dict[str, str] | None, log_name: str, worker: str,
                        accelerator: str) -> list[str]:
    """What each worker runs (the same line on all: the TPU runtime tells each its process id)."""
    command = job_command(argv, env, log_name)
    n = hosts_of(accelerator)
    workers = range(n) if worker == "all" else [int(worker)]
    return [f"worker {w}/{n}: {command}" for w in workers]


@dataclass
class Result:
    rc: int
    out: str = ""


Runner = Callable[[list[str], bool], Result]  # (argv, stream output) -> result


@dataclass
class Slice:
    name: str
    zone: str
    accelerator: str = "v3-8"
    version: str = "tpu-ubuntu2204-base"
    project: str | None = None
    spot: bool = False
    preemptible: bool = False
    jax_version: str = "0.10.2"
    gcloud: str = "gcloud"
    extra_create: list[str] = field(default_factory=list)

    def _base(self, verb: str) -> list[str]:
        cmd = [self.gcloud, "compute", "tpus", "tpu-vm", verb]
        return cmd

    def _loc(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def describe(self) -> list[str]:
        return self._base("describe") + [self.name, *self._loc(), "--format=value(state)"]

    def create(self) -> list[str]:
        cmd = self._base("create") + [
            self.name,
            *self._loc(),
            f"--accelerator-type={self.accelerator}",
            f"--version={self.version}",
        ]
        if self.spot:
            cmd.append("--spot")
        if self.preemptible:
            cmd.append("--preemptible")
        return cmd + list(self.extra_create)

    def delete(self) -> list[str]:
        return self._base("delete") + [self.name, *self._loc(), "--quiet"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self._base("ssh") + [self.name, *self._loc(), f"--worker={worker}", f"--command={command}"]

    def scp(self, local: str, remote: str, worker: str = "all") -> list[str]:
        return self._base("scp") + [local, f"{self.name}:{remote}", *self._loc(), f"--worker={worker}"]


def setup_command(jax_version: str) -> str:
    """Shell run on every worker: unpack the checkout, make a venv, install ptm + jax[tpu]; marks success."""
    return " && ".join(
        [
            f"rm -rf {REMOTE_SRC} && mkdir -p {REMOTE_SRC}",
            f"tar xzf ~/ptm-src.tar.gz -C {REMOTE_SRC}",
            f"(test -x {REMOTE_VENV}/bin/python || python3 -m venv {REMOTE_VENV})",
            f"{REMOTE_VENV}/bin/pip install -q --upgrade pip",
            f"{REMOTE_VENV}/bin/pip install -q 'jax[tpu]=={jax_version}' -e {REMOTE_SRC}",
            f"touch {REMOTE_READY}",
        ]
    )


def job_command(argv: Sequence[str], env: dict[str, str] | None = None, log_name: str = "job") -> str:
    """Shell run on every worker: the ptm command from the checkout dir, output also kept on the worker."""
    if not argv:
        raise SystemExit("launch_tpu: give the command after `--`, e.g. -- ptm train --gin_file=...")
    argv = list(argv)
    if argv[0] == "ptm":
        argv[0] = f"{REMOTE_VENV}/bin/ptm"
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    cmd = " ".join(shlex.quote(a) if not a.startswith(REMOTE_VENV) else a for a in argv)
    prefix = f"export {exports} && " if exports else ""
    return (
        f"mkdir -p ~/ptm-logs && cd {REMOTE_SRC} && {prefix}set -o pipefail && "
        f"{cmd} 2>&1 | tee -a ~/ptm-logs/{log_name}.log"
    )


def make_source_tarball(dest: str) -> str:
    """This checkout's code, gin files and configs (no venv, caches or results) as a .tar.gz."""

    def keep(ti: tarfile.TarInfo):
        parts = Path(ti.name).parts
        if any(
            p in ("__pycache__", ".pytest_cache", ".ruff_cache") or p.endswith(".egg-info") for p in parts
        ):
            return None
        return ti

    with tarfile.open(dest, "w:gz") as tar:
        for item in SHIP:
            if (REPO / item).exists():
                tar.add(REPO / item, arcname=item, filter=keep)
    return dest


def subprocess_runner(log: str | None = None) -> Runner:
    def run(argv: list[str], stream: bool) -> Result:
        if not stream:
            p = subprocess.run(argv, capture_output=True, text=True)
            return Result(p.returncode, p.stdout + p.stderr)
        logf = open(log, "a") if log else None
        try:
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert p.stdout is not None
            for line in p.stdout:
                sys.stdout.write(line)
                if logf:
                    logf.write(line)
                    logf.flush()
            return Result(p.wait())
        finally:
            if logf:
                logf.close()

    return run


def dry_runner(
    assume_state: str, assume_installed: bool = False, printer: Callable[[str], None] = print
) -> Runner:
    """Prints each command instead of running it. `describe` first answers `assume_state` (NOT_FOUND = no such
    TPU) and then follows the printed create/delete commands; everything else succeeds."""
    st = {"state": assume_state, "installed": assume_installed}

    def run(argv: list[str], stream: bool) -> Result:
        printer("+ " + shlex.join(argv))
        verb = argv[4] if len(argv) > 4 else ""
        if verb == "describe":
            return Result(1, "ERROR: NOT_FOUND") if st["state"] == "NOT_FOUND" else Result(0, st["state"])
        if verb == "create":
            st.update(state="READY", installed=False)
        elif verb == "delete":
            st["state"] = "NOT_FOUND"
        elif verb == "ssh" and any(a.endswith(f"test -f {REMOTE_READY}") for a in argv):
            return Result(0 if st["installed"] else 1)
        elif verb == "ssh" and any(REMOTE_READY in a for a in argv):
            st["installed"] = True
        return Result(0)

    return run


class Launcher:
    def __init__(
        self,
        tpu: Slice,
        runner: Runner,
        *,
        say: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 30.0,
        ready_timeout_s: float = 1800,
    ):
        self.tpu, self.run_cmd = tpu, runner
        self.say = say or (lambda s: print(f"[launch_tpu] {s}", file=sys.stderr, flush=True))
        self.sleep, self.poll_s, self.ready_timeout_s = sleep, poll_s, ready_timeout_s

    def state(self) -> str:
        r = self.run_cmd(self.tpu.describe(), False)
        if r.rc != 0:
            if "NOT_FOUND" in r.out or "not found" in r.out.lower():
                return "NOT_FOUND"
            raise RuntimeError(f"gcloud describe failed (rc={r.rc}): {r.out.strip()[-500:]}")
        return (r.out.strip().splitlines() or ["UNKNOWN"])[-1].strip()

    def _check(self, argv: list[str], what: str, stream: bool = True) -> None:
        r = self.run_cmd(argv, stream)
        if r.rc != 0:
            raise RuntimeError(f"{what} failed (rc={r.rc}) {r.out.strip()[-500:]}")

    def ensure_ready(self) -> bool:
        """Make the slice exist and be READY; returns True when it was (re)created (so it needs setup)."""
        created = False
        waited = 0.0
        while True:
            st = self.state()
            if st == "READY":
                return created
            if st == "NOT_FOUND":
                self.say(f"creating {self.tpu.name} ({self.tpu.accelerator}, {self.tpu.zone})")
                self._check(self.tpu.create(), "create")
                created = True
                continue
            if st in GONE_STATES:
                self.say(f"{self.tpu.name} is {st}: deleting and re-creating it")
                self._check(self.tpu.delete(), "delete")
                continue
            if waited >= self.ready_timeout_s:  # CREATING, STARTING, REPAIRING, ...
                raise RuntimeError(f"{self.tpu.name} stayed {st} for {waited:.0f} s")
            self.say(f"{self.tpu.name} is {st}; waiting")
            self.sleep(self.poll_s)
            waited += self.poll_s

    def setup(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            tar = make_source_tarball(os.path.join(d, "ptm-src.tar.gz"))
            self.say("copying the checkout to every worker")
            self._check(self.tpu.scp(tar, "~/ptm-src.tar.gz"), "scp")
        self.say(f"installing ptm and jax[tpu]=={self.tpu.jax_version} on every worker")
        self._check(self.tpu.ssh(setup_command(self.tpu.jax_version)), "setup")

    def installed(self) -> bool:
        return self.run_cmd(self.tpu.ssh(f"test -f {REMOTE_READY}"), False).rc == 0

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        worker: str = "all",
        max_restarts: int = 20,
        force_setup: bool = False,
        log_name: str = "job",
    ) -> int:
        command = job_command(argv, env, log_name)
        restarts = 0
        while True:
            fresh = self.ensure_ready()
            if fresh or force_setup or not self.installed():
                self.setup()
                force_setup = False
            self.say(f"starting on worker(s) {worker}: {shlex.join(list(argv))}")
            rc = self.run_cmd(self.tpu.ssh(command, worker), True).rc
            if rc == 0:
                self.say("finished")
                return 0
            st = self.state()
            if st == "READY":
                self.say(f"command failed with rc={rc} on a healthy slice; not retrying")
                return rc
            restarts += 1
            if restarts > max_restarts:
                self.say(f"slice {st} again after {max_restarts} restarts; giving up")
                return rc
            self.say(
                f"slice is {st} (rc={rc}): restart {restarts}/{max_restarts}, relaunching on every worker "
                "(it resumes from its last completed stage / newest checkpoint)"
            )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("run", "create", "setup", "ssh", "status", "delete"))
    ap.add_argument("--name", required=True, help="TPU VM name")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project")
    ap.add_argument("--accelerator", default="v3-8", help="e.g. v3-8, v3-32, v3-128, v3-256")
    ap.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version (image)")
    ap.add_argument("--spot", action="store_true", help="Spot VMs (cheaper, preemptible)")
    ap.add_argument("--preemptible", action="store_true", help="legacy preemptible VMs")
    ap.add_argument("--jax-version", default="0.10.2", help="jax[tpu] version installed on the workers")
    ap.add_argument("--worker", default="all", help="'all' (SPMD jobs), or one worker index for a 1-host job")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the job")
    ap.add_argument("--max-restarts", type=int, default=20)
    ap.add_argument("--force-setup", action="store_true", help="re-ship and re-install even if installed")
    ap.add_argument("--log", help="also append the streamed output to this local file")
    ap.add_argument("--log-name", default="job", help="name of the log kept on each worker (~/ptm-logs/)")
    ap.add_argument("--gcloud", default="gcloud", help="gcloud executable")
    ap.add_argument("--poll", type=float, default=30.0, help="seconds between state polls while waiting")
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    ap.add_argument(
        "--assume-state",
        default="NOT_FOUND",
        help="--dry-run: what `describe` reports (NOT_FOUND, READY, PREEMPTED, ...)",
    )
    ap.add_argument("--assume-installed", action="store_true", help="--dry-run: ptm is already installed")
    args = ap.parse_args(argv)

    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--env {kv!r}: expected K=V")
        env[k] = v
    tpu = Slice(
        args.name,
        args.zone,
        args.accelerator,
        args.version,
        args.project,
        args.spot,
        args.preemptible,
        args.jax_version,
        args.gcloud,
    )
    if args.dry_run:
        runner = dry_runner(args.assume_state, args.assume_installed)
    else:
        runner = subprocess_runner(args.log)
    la = Launcher(tpu, runner, poll_s=args.poll, sleep=(lambda s: None) if args.dry_run else time.sleep)
    try:
        if args.action == "run":
            check_spmd(rest, args.worker, args.accelerator)
            if args.dry_run:
                for line in per_worker_commands(rest, env, args.log_name, args.worker, args.accelerator):
                    print(line)
            return la.run(
                rest,
                env=env,
                worker=args.worker,
                max_restarts=args.max_restarts,
                force_setup=args.force_setup,
                log_name=args.log_name,
            )
        if args.action == "create":
            la.ensure_ready()
        elif args.action == "setup":
            la.ensure_ready()
            la.setup()
        elif args.action == "ssh":
            if not rest:
                ap.error("ssh needs a command after `--`")
            return runner(tpu.ssh(shlex.join(rest), args.worker), True).rc
        elif args.action == "status":
            print(la.state())
        elif args.action == "delete":
            return runner(tpu.delete(), True).rc
    except RuntimeError as e:
        print(f"launch_tpu: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
