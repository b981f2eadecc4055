"""Multi-host design of the lm-eval backend: two real JAX processes (loopback coordinator, gloo, 2 CPU devices each)
each load the checkpoint onto a mesh over their own devices, run the same requests, and get exactly the numbers of
a single process with the same local mesh (log-likelihoods, greedy and sampled generations)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.scale.cluster import spawn, wait_all

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'ptm[lm_eval]')")

REPO = Path(__file__).resolve().parents[2]
WORKER = r'''
import json, sys
from ptm.parallel import distributed
distributed.initialize()
import jax
from lm_eval.api.instance import Instance
from ptm.eval import lm_eval_model as L
ckpt, out = sys.argv[1], sys.argv[2]
lm = L.PtmLM(checkpoint=ckpt, mesh="1x-1x1", batch_size=4)
mk = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("t", 0, 1))
ll = lm.loglikelihood([mk("loglikelihood", ("Question: 2+2=", " 4")), mk("loglikelihood", ("", "hello world"))])
gen = lm.generate_until([mk("generate_until", ("Once upon", {"max_gen_toks": 8})),
                         mk("generate_until", ("Tell me", {"max_gen_toks": 8, "do_sample": True, "temperature": 1.0}))])
res = {"pid": jax.process_index(), "n": jax.process_count(), "local": jax.local_device_count(),
       "global": jax.device_count(), "ll": ll, "gen": gen}
open(f"{out}/res_{jax.process_count()}_{jax.process_index()}.json", "w").write(json.dumps(res))
'''


def _run(n, ckpt, out):
    logs = out / f"log_{n}"
    procs = spawn([sys.executable, "-c", WORKER, str(ckpt), str(out)], logs, num_processes=n,
                  devices_per_process=2, env_extra={"PYTHONPATH": str(REPO)})
    wait_all(procs, logs, timeout=300)
    return [json.loads((out / f"res_{n}_{i}.json").read_text()) for i in range(n)]


@pytest.mark.slow  # ~30 s idle, ~70 s on the shared dev machine: three interpreters start jax + lm-eval
def test_every_process_computes_the_single_process_numbers(tmp_path, tiny_config, tiny_params):
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format

    ckpt = tmp_path / "ck"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(ckpt / "params", tiny_params)
    ckptr.wait_until_finished()
    ckpt_format.write_meta(ckpt, ckpt_format.make_meta(tiny_config.to_dict(), step=1))
    two = _run(2, ckpt, tmp_path)
    (one,) = _run(1, ckpt, tmp_path)
    assert [(r["pid"], r["n"], r["local"], r["global"]) for r in two] == [(0, 2, 2, 4), (1, 2, 2, 4)]
    for r in two:
        assert r["ll"] == one["ll"] and r["gen"] == one["gen"]
