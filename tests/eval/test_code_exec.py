"""The code-execution sandbox and HumanEval scoring: the opt-in, canonical solutions pass, wrong ones fail, and hostile
programs are contained and scored as failures without harming the host (with the audit hook, and — where the OS
layer can do it alone — without it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ptm.errors import PtmError
from ptm.eval import code_exec as ce
from ptm.eval import scorers


@pytest.fixture(autouse=True)
def _allowed():
    ce.register()
    ce.allow_code_execution(True)
    yield
    ce.allow_code_execution(False)


@pytest.fixture(scope="module")
def sandbox():
    ce.allow_code_execution(True)
    sb = ce.Sandbox(timeout_s=3.0, workers=2)
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def bare():
    """No audit hook: only the OS layer (own uid, rlimits, network namespace, process group / uid kill)."""
    ce.allow_code_execution(True)
    sb = ce.Sandbox(timeout_s=2.0, workers=2, guard=False)
    yield sb
    sb.close()


def test_nothing_runs_without_the_opt_in():
    ce.allow_code_execution(False)
    with pytest.raises(PtmError, match="--allow-code-execution"):
        ce.Sandbox()
    with pytest.raises(PtmError, match="--allow-code-execution"):
        ce.score_completions([{"prompt": "", "test": "", "entry_point": "f"}], [["x"]], [1])
    err = scorers.validate_item("humaneval", "", None, {"prompt": "def f():\n", "test": "", "entry_point": "f"})
    assert err and "--allow-code-execution" in err


def test_cli_refuses_code_eval_without_the_flag(capsys):
    from ptm.cli import main

    assert main(["eval", "somewhere", "--code-eval", "humaneval"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err


def test_all_164_humaneval_canonical_solutions_pass_and_wrong_ones_fail(sandbox):
    probs = ce.load_problems()
    assert len(probs) == 164 and probs[0]["task_id"] == "HumanEval/0"
    t0 = time.perf_counter()
    res = sandbox.run_many([ce.canonical_program(p) for p in probs])
    elapsed = time.perf_counter() - t0
    bad = [(p["task_id"], r.status, r.detail) for p, r in zip(probs, res, strict=True) if not r.passed]
    assert not bad, bad
    print(f"\n164 canonical HumanEval solutions: {elapsed:.1f}s, {164 / elapsed:.1f} executions/s")
    wrong = [ce.program_for(p, "    return None\n") for p in probs[:6]]
    assert not any(r.passed for r in sandbox.run_many(wrong))


def test_pass_at_k_from_completions(sandbox):
    p = ce.load_problems()[0]
    comps = [p["canonical_solution"]] * 3 + ["    return True\n", "    raise ValueError\n"]
    metrics, per, statuses = ce.score_completions([p], [comps], [1, 2, 5], sandbox)
    assert per[0]["n"] == 5 and per[0]["c"] == 3 and statuses == {"passed": 3, "failed": 2}
    assert metrics["pass@1"] == pytest.approx(scorers.pass_at_k(5, 3, 1))
    assert metrics["pass@2"] == pytest.approx(scorers.pass_at_k(5, 3, 2)) and metrics["pass@5"] == 1.0


def test_completion_forms_and_exit_tricks(sandbox):
    p = ce.load_problems()[2]  # truncate_number
    full = p["prompt"] + p["canonical_solution"]
    forms = {
        "continuation": (p["canonical_solution"], True),
        "whole function in a fence": (f"Here you go:\n```python\n{full}\n```\nDone.", True),
        "exit before the tests": ("    import sys; sys.exit(0)\n", False),
        "os._exit(0) before the tests": ("    import os; os._exit(0)\n", False),
        "syntax error": ("    return (\n", False),
    }
    res = sandbox.run_many([ce.program_for(p, c) for c, _ in forms.values()])
    assert {k: r.passed for k, r in zip(forms, res, strict=True)} == {k: v for k, (_, v) in forms.items()}


def test_evalplus_and_mbpp_formats_go_through_the_same_runner(sandbox, tmp_path):
    plus = {"task_id": "HumanEval/X", "prompt": "def add(a, b):\n", "entry_point": "add",
            "canonical_solution": "    return a + b\n", "base_input": [[1, 2], [0.1, 0.2]],
            "plus_input": [[10**20, 1], [[1], [2]]], "atol": 0}
    mbpp = {"task_id": 7, "prompt": "Write a function to square a number.", "code": "def sq(x):\n    return x*x\n",
            "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4"]}
    f = tmp_path / "plus.jsonl"
    f.write_text(json.dumps(plus) + "\n" + json.dumps(mbpp) + "\n")
    probs = ce.load_problems(f)
    assert [ce.problem_kind(p) for p in probs] == ["evalplus", "mbpp"]
    progs = [ce.canonical_program(probs[0]),
             ce.program_for(probs[0], "    return a + b if isinstance(a, list) else b + a\n"),
             ce.program_for(probs[0], "    return a * 1 + b if b != 2 else 4\n"),
             ce.canonical_program(probs[1]), ce.program_for(probs[1], "def sq(x):\n    return x + x\n")]
    assert [r.passed for r in sandbox.run_many(progs)] == [True, True, False, True, False]


def test_humaneval_scorer_on_eval_set_items(sandbox, tmp_path, monkeypatch):
    from ptm.eval.evalset import parse_item

    monkeypatch.setattr(ce, "_DEFAULT", sandbox)
    p = ce.load_problems()[0]
    meta = {k: p[k] for k in ("prompt", "test", "entry_point")} | {"k": 2}
    item = parse_item({"task": "humaneval", "scorer": "humaneval", "category": "coding", "reference": "",
                       "messages": [{"role": "user", "content": p["prompt"]}], "meta": meta}, "x:1")
    sc = scorers.get_scorer("humaneval")
    assert scorers.num_samples_for(sc, item.meta, 1) == 2
    m = sc.fn([p["canonical_solution"], "    return 1\n"], "", item.meta)
    assert m["pass@1"] == 0.5 and m["score"] == m["pass@2"] == 1.0


# -------------------------------------------------------------------------------------- hostile programs


def _no_sandbox_processes():
    out = subprocess.run(["ps", "-e", "-o", "uid=,stat="], capture_output=True, text=True).stdout.split("\n")
    rows = [ln.split() for ln in out if ln.strip()]
    return [r for r in rows if ce.UID_RANGE[0] <= int(r[0]) <= ce.UID_RANGE[1]]


@pytest.fixture
def secret_home(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_rsa"
    key.write_text("-----BEGIN FAKE KEY----- ptm-secret-7f3a -----END FAKE KEY-----\n")
    key.chmod(0o600)
    return home


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    return srv


def _hostile(home, port, target):
    key = home / ".ssh" / "id_rsa"
    return {
        "infinite loop": "while True:\n    pass\n",
        "sleep forever": "import time\ntime.sleep(3600)\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "allocate 50 GB": "x = bytearray(50 * 2**30)\nx[::4096] = b'1' * len(x[::4096])\n",
        "write outside": f"open({str(target)!r}, 'w').write('pwned')\n",
        "read ~/.ssh": f"print(open({str(key)!r}).read())\nraise ValueError(open({str(key)!r}).read())\n",
        "read ~ via HOME": "import os\nraise ValueError(open(os.path.expanduser('~/.ssh/id_rsa')).read())\n",
        "socket to 127.0.0.1": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                               "s.sendall(b'hello')\n",
        "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "escape the group": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\n"
                            "raise SystemExit(1)\n",
        "flood stderr": "import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n",
    }


@pytest.mark.parametrize("which", ["sandbox", "bare"])
def test_hostile_programs_are_contained_and_fail(which, sandbox, bare, secret_home, tmp_path):
    sb = {"sandbox": sandbox, "bare": bare}[which]
    srv = _listener()
    target = tmp_path / "outside" / "pwned.txt"
    target.parent.mkdir()
    progs = _hostile(secret_home, srv.getsockname()[1], target)
    me = os.getpid()
    t0 = time.perf_counter()
    res = dict(zip(progs, sb.run_many(list(progs.values())), strict=True))
    wall = time.perf_counter() - t0
    try:
        conn, _ = srv.accept()
        conn.close()
        connected = True
    except TimeoutError:
        connected = False
    finally:
        srv.close()
    assert os.getpid() == me  # still alive: "kill the parent" did not reach us
    assert not connected, "a sandboxed program reached a listener on 127.0.0.1"
    assert not target.exists()
    for name, r in res.items():
        assert not r.passed, (name, r)
        assert "ptm-secret-7f3a" not in r.detail, (name, r.detail)
    for name in ("infinite loop", "sleep forever"):
        assert res[name].status == "timeout"
    assert wall < 60, wall
    assert not _no_sandbox_processes(), "sandbox processes (or zombies) left behind"


def test_supervisor_runs_on_a_plain_stdlib_python(tmp_path):
    """The supervisor script itself is stdlib-only and refuses a bad header cleanly (exit 3 would be set-up)."""
    p = subprocess.run([sys.executable, "-I", "-S", "-c", "import ast, sys; ast.parse(sys.stdin.read())"],
                       input=ce.SUPERVISOR, text=True, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_garbage_and_null_bytes_are_failures_not_sandbox_errors(sandbox):
    res = sandbox.run_many(["def f(:\n", "x = 1\x00\n", "\udcff = 3\n", "print('ok')\n"])
    assert [r.status for r in res] == ["failed", "failed", "failed", "passed"]


def test_ptm_eval_code_eval_end_to_end(tmp_path, tiny_config, tiny_params):
    """`ptm eval CKPT --code-eval humaneval --allow-code-execution`: n samples per problem from ptm's decoder,
    executed in the sandbox, pass@k in the JSON (a random model passes nothing, and nothing is a sandbox error)."""
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format
    from ptm.cli import main

    ckpt = tmp_path / "ck"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(ckpt / "params", tiny_params)
    ckptr.wait_until_finished()
    ckpt_format.write_meta(ckpt, ckpt_format.make_meta(tiny_config.to_dict(), step=1))
    out = tmp_path / "code.json"
    assert main(["eval", str(ckpt), "--code-eval", "humaneval", "--allow-code-execution", "--code-limit", "3",
                 "--code-samples", "2", "--code-k", "1,2", "--code-max-new-tokens", "16", "--batch-size", "8",
                 "--out", str(out)]) == 0
    rec = json.loads(out.read_text())["results"][0]["code"]["humaneval"]
    assert rec["n_problems"] == 3 and rec["executions"] == 6 and set(rec["metrics"]) == {"pass@1", "pass@2"}
    assert set(rec["statuses"]) <= {"failed", "passed", "timeout"}
    assert rec["settings"]["stops"][:5] == list(ce.CODEX_STOPS) and rec["settings"]["sandbox"]["audit_hook"]
