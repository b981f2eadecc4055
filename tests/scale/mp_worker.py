"""One process of a local multi-process JAX cluster (started by tests/scale/test_multihost.py).

Usage: python mp_worker.py SCENARIO OUT_DIR [ARGS...]; coordinator/process id come from PTM_* variables.
Each process writes OUT_DIR/result_<pid>.npz (plus scenario files) for the test to compare.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ptm.parallel import distributed

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def _global_inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 24)).astype(np.float32)


def _mesh():
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))


@scenario
def compute(out: str) -> dict:
    """A sharded matmul: rows over `data` (each process feeds only its own rows), columns over `model`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, w = _global_inputs()
    mesh = _mesh()
    xs = NamedSharding(mesh, P("data", None))
    rows = x.shape[0] // jax.process_count()
    pid = jax.process_index()
    gx = jax.make_array_from_process_local_data(xs, x[pid * rows : (pid + 1) * rows], x.shape)
    gw = jax.device_put(w, NamedSharding(mesh, P(None, "model")))

    @jax.jit
    def f(a, b):
        y = jnp.tanh(a @ b)
        return y, jnp.sum(y * y)

    y, total = f(gx, gw)
    return {"y": multihost_utils.process_allgather(y, tiled=True), "total": np.asarray(total)}


@scenario
def ckpt(out: str) -> dict:
    """Every process saves its shards into one folder, then restores with the same shardings."""
    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, w = _global_inputs()
    mesh = _mesh()
    shard = {"x": NamedSharding(mesh, P("data", "model")), "w": NamedSharding(mesh, P(None, "model"))}
    tree = {"x": jax.device_put(x, shard["x"]), "w": jax.device_put(w, shard["w"])}
    path = f"{out}/ckpt"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shard)
    back = ckptr.restore(path, abstract)
    local_ok = all(
        np.array_equal(np.asarray(s.data), np.asarray(t.data))
        for k in tree
        for s, t in zip(back[k].addressable_shards, tree[k].addressable_shards, strict=True)
    )
    return {
        "x": multihost_utils.process_allgather(back["x"], tiled=True),
        "local_ok": np.asarray(local_ok),
        "n_local_shards": np.asarray(len(back["x"].addressable_shards)),
    }


def tiny_model_config():
    from ptm.model.config import ModelConfig

    return ModelConfig(
        vocab_size=64,
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        dtype="float32",
        max_seq_len=16,
    )


def global_batch(i: int, batch: int = 8, seq: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    tokens = rng.integers(1, 64, size=(batch, seq + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": (rng.random((batch, seq)) < 0.7).astype(np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }


@scenario
def train(out: str) -> dict:
    """The real sharded train step (data 2 x fsdp 2 x tensor 2, grad accumulation 2), a checkpoint written by
    every process through the run checkpointer, restored, and one more step from both copies."""
    import jax
    from jax.experimental import multihost_utils

    from ptm.ckpt import format as ckpt_format
    from ptm.parallel.mesh import MeshConfig, batch_sharding, make_mesh
    from ptm.train.checkpoint import RunCheckpointer
    from ptm.train.optimizer import OptimizerConfig, make_optimizer
    from ptm.train.step import init_state, jit_train_step, state_shardings

    cfg = tiny_model_config()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), total_steps=10)
    step = jit_train_step(cfg, opt, mesh, grad_accum_steps=2)
    bsh = batch_sharding(mesh)

    def put(b):  # every process holds the same global batch; each device takes its own rows
        return {k: jax.make_array_from_callback(v.shape, bsh, lambda idx, v=v: v[idx]) for k, v in b.items()}

    state = init_state(cfg, opt, mesh, seed=0)
    losses = []
    for i in range(2):
        state, m = step(state, put(global_batch(i)))
        losses.append(float(m["loss"]))
    ck = RunCheckpointer(f"{out}/run", save_every=1, keep=1)
    ck.save(2, state, None, ckpt_format.make_meta(cfg.to_dict(), 2), force=True)
    ck.wait()
    abstract, _ = state_shardings(cfg, opt, mesh)
    restored, meta = ck.restore(2, abstract, None)
    ck.close()
    state, m = step(state, put(global_batch(2)))
    restored, m_r = step(restored, put(global_batch(2)))
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    params_r = multihost_utils.process_allgather(restored["params"], tiled=True)
    flat = {
        f"p/{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    flat_r = {
        f"r/{jax.tree_util.keystr(k)}": np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(params_r)
    }
    return {
        "losses": np.array(losses + [float(m["loss"])]),
        "loss_restored": np.asarray(float(m_r["loss"])),
        "meta_step": np.asarray(meta["step"]),
        **flat,
        **flat_r,
    }


@scenario
def merge(out: str, pre: str, general: str, skill: str, dst: str) -> dict:
    """The streaming merge engine on a mesh over every process's devices: each process reads and writes only
    its shards of each tensor into one shared output."""
    import jax
    from jax.sharding import Mesh

    from ptm.merge.engine import merge as run_merge
    from ptm.merge.recipe import Recipe

    mesh = Mesh(np.array(jax.devices()), ("shard",))
    summary = run_merge(
        Recipe(
            method="task_arithmetic",
            inputs={"pre": pre, "general": general, "skills": [skill]},
            weights=[0.3],
            out=dst,
        ),
        mesh=mesh,
        progress=False,
        summary=False,
    )
    return {"bytes_written": np.asarray(summary.bytes_written), "bytes_read": np.asarray(summary.bytes_read)}


@scenario
def loop(out: str, data_path: str, run_dir: str) -> dict:
    """The real training loop (per-host data, sharded step, async checkpoints): 2 steps, stop, resume."""
    from ptm.data.pipeline import DataConfig, SourceConfig
    from ptm.model.config import ModelConfig
    from ptm.parallel.mesh import MeshConfig
    from ptm.train.loop import train
    from ptm.train.optimizer import OptimizerConfig

    cfg = ModelConfig(
        vocab_size=259,
        embed_dim=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        mlp_dim=64,
        dtype="float32",
    )
    kw = dict(
        data=DataConfig(sources=[SourceConfig(data_path)], seq_len=48, global_batch_size=8, num_epochs=1),
        model=cfg,
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.1),
        mesh=MeshConfig(data=2, fsdp=-1, tensor=1),
        save_every=2,
        progress=False,
    )
    first = train(run_dir, stop_after_steps=2, **kw)
    second = train(run_dir, **kw)
    return {
        "first_steps": np.asarray(first.steps),
        "resumed_from": np.asarray(second.resumed_from or -1),
        "steps": np.asarray(second.steps),
        "final_loss": np.asarray(second.final_loss),
    }


@scenario
def decode(out: str) -> dict:
    """SPMD generation and log-likelihoods on a random tiny model: each process feeds only its rows of each
    batch; the gathered results (the same on every process) are returned."""
    import jax

    from ptm.data.tokenizers import load_tokenizer
    from ptm.eval.decode import GenerationConfig, generate, loglikelihoods
    from ptm.eval.harness import place_on_mesh
    from ptm.model.config import ModelConfig
    from ptm.model.llama import abstract_params
    from ptm.parallel.mesh import MeshConfig, make_mesh

    cfg = ModelConfig(vocab_size=384, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, dtype="float32", max_seq_len=64)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), abstract_params(cfg))
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1))
    params = place_on_mesh(params, cfg, mesh)
    tok = load_tokenizer("byte")
    prompts = [list(rng.integers(3, 250, size=int(n))) for n in rng.integers(2, 20, size=13)]
    stats: dict = {}
    read: list[int] = []

    class Lazy(list):  # what a host tokenizes: only the prompts it reads
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    gens = generate(params, cfg, tok, Lazy(prompts), GenerationConfig(max_new_tokens=12, chunk=4), batch_size=8,
                    mesh=mesh, stops=[("a",) if i % 3 == 0 else () for i in range(13)],
                    sort_keys=[len(p) for p in prompts], stats=stats)
    gen_read = sorted(set(read))
    pairs = [(p[:-3], p[-3:]) for p in prompts if len(p) > 4]
    read.clear()
    lls = loglikelihoods(params, cfg, tok, Lazy(pairs), batch_size=8, mesh=mesh, sort_keys=[len(p) for p in prompts
                                                                                               if len(p) > 4])
    ll_read = sorted(set(read))
    eager = generate(params, cfg, tok, prompts, GenerationConfig(max_new_tokens=12, chunk=4), batch_size=8,
                     mesh=mesh, stops=[("a",) if i % 3 == 0 else () for i in range(13)])
    width = max(len(g.tokens) for g in gens)
    return {
        "tokens": np.array([g.tokens + [-1] * (width - len(g.tokens)) for g in gens]),
        "logprobs": np.array([g.logprobs + [0.0] * (width - len(g.logprobs)) for g in gens], np.float32),
        "finish": np.array([g.finish for g in gens]),
        "ll": np.array([x[0] for x in lls]),
        "ll_n": np.array([x[1] for x in lls]),
        "ll_greedy": np.array([x[2] for x in lls]),
        "host_tokens": np.asarray(stats["host_generated_tokens"]),
        "gen_read": np.asarray(gen_read), "ll_read": np.asarray(ll_read),
        "eager_tokens": np.array([g.tokens + [-1] * (width - len(g.tokens)) for g in eager]),
    }


@scenario
def code_exec(out: str) -> dict:
    """Sandboxed executions split over the processes: `score_completions` (3 problems with 2, 2 and 1 samples:
    5 executions) and the eval-set `humaneval` scorer (3 samples). The Sandbox subclass only records which
    programs this process ran."""
    from ptm.eval import code_exec as ce

    ce.allow_code_execution(True)
    ran: list[str] = []

    class Recording(ce.Sandbox):
        def run_many(self, sources, progress=None):
            ran.extend(sources)
            return super().run_many(sources, progress)

    def prob(i: int) -> dict:
        return {"task_id": f"t/{i}", "entry_point": "add", "prompt": "def add(a, b):\n",
                "test": "def check(f):\n    assert f(2, 3) == 5\n"}

    ok, bad = "    return a + b\n", "    return a - b\n"
    sb = Recording(timeout_s=10, workers=2)
    stats: dict = {}
    metrics, per, statuses = ce.score_completions([prob(0), prob(1), prob(2)], [[ok, bad], [bad, bad], [ok]], [1],
                                                  sb, stats=stats)
    n_scored = len(ran)
    ce._DEFAULT = Recording(timeout_s=10, workers=2)  # what humaneval_scorer runs in
    h = ce.humaneval_scorer([ok, bad, ok], None, {**prob(3), "k": 2})
    sb.close()
    return {"statuses": np.array([s for rec in per for s in rec["statuses"]]), "pass1": np.float64(metrics["pass@1"]),
            "by_host": np.asarray(stats["executions_by_host"]), "ran_scored": np.int64(n_scored),
            "ran_total": np.int64(len(ran)), "he": np.array([h["pass@1"], h["pass@2"]])}


def main(argv: list[str]) -> int:
    name, out = argv[0], argv[1]
    info = distributed.initialize()
    result = SCENARIOS[name](out, *argv[2:])
    np.savez(f"{out}/result_{info.process_id}.npz", **result)
    with open(f"{out}/info_{info.process_id}.json", "w") as f:
        json.dump(info.__dict__ | {"is_coordinator": info.is_coordinator}, f)
    distributed.sync("done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
