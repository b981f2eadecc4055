"""The training loop: data -> sharded step -> async Orbax checkpoints, resuming exactly after preemption.

`train()` is the one function gin binds for `ptm train` (skill, CFT, RT, SFT and pretraining runs differ only in
data, init and hyper-parameters; see gin/runs/).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import numpy as np
from etils import epath

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.params import check_same_model, load_params
from ptm.data.pipeline import DataConfig, build_train_data
from ptm.data.tokenizers import load_tokenizer
from ptm.errors import CheckpointError, ConfigError
from ptm.model.config import ModelConfig
from ptm.model.llama import flops_per_token, param_count
from ptm.parallel import sync
from ptm.parallel.mesh import DEFAULT_RULES, MeshConfig, Rules, batch_sharding, data_parallel_size, make_mesh
from ptm.train.checkpoint import RunCheckpointer
from ptm.train.metrics import MetricsLogger, peak_flops_per_device
from ptm.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from ptm.train.step import init_state, jit_train_step, state_shardings


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    resumed_from: int | None
    final_loss: float | None
    wall_seconds: float
    data: dict[str, Any] = field(default_factory=dict)


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train(
    run_dir: str,
    data: DataConfig,
    model: ModelConfig = ModelConfig(),  # noqa: B008 (frozen dataclass)
    optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008
    mesh: MeshConfig = MeshConfig(),  # noqa: B008
    rules: Rules = DEFAULT_RULES,
    tokenizer: str = "byte",
    init_from: str | None = None,
    grad_accum_steps: int = 1,
    loss_normalization: str = "token_mean",
    save_every: int = 500,
    keep_checkpoints: int = 2,
    async_checkpointing: bool = True,
    log_every: int = 10,
    seed: int = 0,
    stop_after_steps: int | None = None,
    config_text: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` on `data`; resume from `<run_dir>/checkpoints` if a complete checkpoint exists.

    init_from: a model checkpoint whose params (only) start a fresh run (skill runs from theta_pre, CFT from
        theta_G). Ignored when resuming.
    stop_after_steps: stop early (e.g. to test resume); the LR schedule still spans the full run.
    config_text: the operative gin config, saved as `<run_dir>/config.gin` for the record.
    """
    t0 = time.perf_counter()
    from ptm.parallel import distributed

    distributed.initialize()
    out = epath.Path(run_dir)
    pidx, pcount = jax.process_index(), jax.process_count()
    is_main = pidx == 0

    tok = load_tokenizer(tokenizer, data.seqio_modules)  # (`seqio:NAME`: the Task's vocabulary)
    if model.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model vocab_size={model.vocab_size} < tokenizer {tokenizer!r} vocab {tok.vocab_size}"
        )
    data_iter, stats = build_train_data(data, tok, process_index=pidx, process_count=pcount)
    total_steps = stats.num_batches
    if total_steps == 0:
        raise ConfigError("the data yields no batches")
    device_mesh = make_mesh(mesh)
    _check_batch(data, grad_accum_steps, data_parallel_size(device_mesh, rules))
    tx = make_optimizer(optimizer, total_steps)
    rules = _hashable_rules(rules)
    step_fn = _train_step_for(model, optimizer, device_mesh, rules, grad_accum_steps, loss_normalization)
    ckpt = RunCheckpointer(out, save_every=save_every, keep=keep_checkpoints, async_save=async_checkpointing)
    state, resumed_from = _restore_or_init(ckpt, model, tx, device_mesh, rules, seed, init_from, data_iter)

    start = int(jax.device_get(state["step"]))
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if config_text is not None:
            (out / "config.gin").write_text(config_text)
        print(
            f"ptm train: {out} | {param_count(model) / 1e6:.2f}M params | mesh {dict(device_mesh.shape)} | "
            f"{stats.examples} examples, {total_steps} steps"
            + (f" | resumed at step {start}" if resumed_from is not None else "")
            + (f" | init from {init_from}" if init_from and resumed_from is None else ""),
            flush=True,
        )

    def meta_at(step: int) -> dict:
        return ckpt_format.make_meta(
            model.to_dict(),
            step,
            data={"train_examples": stats.examples, **stats.seen(step)},
            provenance={"init_from": init_from, "sources": [asdict(s) for s in data.sources],
                        "total_steps": total_steps},
            tokenizer=tokenizer,
        )

    logger = MetricsLogger(str(out / "tensorboard") if is_main else None, total_steps, start, enabled=is_main,
                           progress=progress, jsonl_path=str(out / "metrics.jsonl"))
    end = total_steps if stop_after_steps is None else min(total_steps, start + int(stop_after_steps))
    try:
        state, last_loss = _steps(state, step_fn, data_iter, ckpt, logger, meta_at, start=start, end=end,
                                  total_steps=total_steps, log_every=log_every, pcount=pcount,
                                  batch_sh=batch_sharding(device_mesh, rules),
                                  schedule=make_schedule(optimizer, total_steps),
                                  flops_per_tok=flops_per_token(model, data.seq_len))
    finally:
        ckpt.close()
        logger.close()

    result = TrainResult(
        run_dir=str(out),
        steps=end,
        resumed_from=resumed_from,
        final_loss=last_loss,
        wall_seconds=time.perf_counter() - t0,
        data={"train_examples": stats.examples, **stats.seen(end), "total_steps": total_steps,
              **_stats_summary(stats)},
    )
    if is_main and end == total_steps:
        # atomic (rename / one GCS object): a kill mid-write leaves no half-written "complete" marker
        sync.write_bytes_any_process(str(out / "run.json"), json.dumps(
            {"complete": True, **asdict(result), "model": model.to_dict(), "tokenizer": tokenizer}, indent=1).encode())
    return result


def _check_batch(data: DataConfig, grad_accum_steps: int, dp: int) -> None:
    micro = data.global_batch_size // max(grad_accum_steps, 1)
    if data.global_batch_size % grad_accum_steps or micro % dp:
        raise ConfigError(
            f"global_batch_size={data.global_batch_size} / grad_accum_steps={grad_accum_steps} = {micro} rows per "
            f"microbatch must be a multiple of the data-parallel size {dp}"
        )


def _restore_or_init(ckpt: RunCheckpointer, model: ModelConfig, tx, device_mesh, rules, seed: int,
                     init_from: str | None, data_iter) -> tuple[dict, int | None]:
    """(state, resumed step): the newest complete checkpoint of the run (data iterator restored in place), else
    a fresh state, its params from `init_from` when given."""
    abstract, shardings = state_shardings(model, tx, device_mesh, rules)
    latest = ckpt.latest_step()
    if latest is not None:
        meta = ckpt_format.read_meta(ckpt.directory / str(latest))
        if meta is None:
            raise CheckpointError(f"{ckpt.directory / str(latest)}: not a ptm checkpoint (no ptm/metadata)")
        check_same_model(meta, model, str(ckpt.directory / str(latest)))
        state, _ = ckpt.restore(latest, abstract, data_iter)
        return state, latest
    init_params = None
    if init_from:
        init_params, _ = load_params(init_from, shardings["params"], model_config=model)
    return init_state(model, tx, device_mesh, seed, rules, params=init_params), None


def _steps(state, step_fn, data_iter, ckpt: RunCheckpointer, logger: MetricsLogger, meta_at, *, start: int,
           end: int, total_steps: int, log_every: int, pcount: int, batch_sh, schedule, flops_per_tok: float):
    """Run steps [start, end): log every `log_every`, save when due and at the end. Returns (state, last loss)."""
    peak = peak_flops_per_device()
    last_loss = None
    t_log, tokens_since = time.perf_counter(), 0
    last_saved = start
    for step in range(start, end):
        local = next(data_iter)
        tokens_since += int(np.sum(local["segment_ids"] != 0)) * pcount
        state, metrics = step_fn(state, _global_batch(local, batch_sh))
        done = step + 1
        if done % log_every == 0 or done == end:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = max(time.perf_counter() - t_log, 1e-9)
            m["lr"] = float(schedule(step))
            m["tokens_per_s"] = tokens_since / dt
            if peak:
                m["mfu"] = m["tokens_per_s"] * flops_per_tok / (peak * jax.device_count())
            last_loss = m["loss"]
            logger.log(done, m)
            t_log, tokens_since = time.perf_counter(), 0
        logger.advance()
        if ckpt.save(done, state, data_iter, functools.partial(meta_at, done), force=done in (total_steps, end)):
            last_saved = done
            logger.flush()
    if end > start and last_saved != end:  # early stop: keep the position so a rerun continues
        ckpt.save(end, state, data_iter, functools.partial(meta_at, end), force=True)
    return state, last_loss


def _hashable_rules(rules) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@functools.lru_cache(maxsize=8)
def _train_step_for(model, optimizer, mesh, rules, grad_accum_steps, loss_normalization):
    """One jitted step per (model, optimizer config, mesh, ...): the schedule lives in the optimizer state, so runs
    of different lengths in one process (e.g. `ptm experiment`) reuse the traced and compiled step."""
    return jit_train_step(
        model,
        make_optimizer(optimizer, 1),
        mesh,
        rules,
        grad_accum_steps=grad_accum_steps,
        loss_normalization=loss_normalization,
    )


def _stats_summary(stats) -> dict:
    d = stats.to_dict()
    return {
        k: d[k] for k in ("skipped", "truncated", "dropped", "packed_rows", "packing_efficiency") if k in d
    }
