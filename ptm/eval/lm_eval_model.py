"""lm-evaluation-harness backend `ptm`: lm-eval's tasks scored by ptm's jitted, sharded decoder.

    import ptm.eval.lm_eval_model            # registers the model name "ptm" with lm-eval
    lm_eval.simple_evaluate(model="ptm", model_args="checkpoint=runs/general,dtype=float32", tasks=[...])
    ptm lm-eval --model ptm --model_args checkpoint=DIR --tasks T --include_path configs/lm_eval   # lm-eval's CLI
    ptm eval CKPT --lm-eval T --lm-eval-include configs/lm_eval --lm-eval-data data/toy            # ptm's CLI

lm-eval is an optional extra (`pip install 'ptm[lm_eval]'`); importing this module without it raises a PtmError
that says so, and no other ptm module imports it at module level.

Requests map onto `ptm.eval.decode`:
  - `loglikelihood`: lm-eval's own tokenisation rules (TemplateLM: trailing context spaces move to the
    continuation, an empty context becomes the prefix token), then one `decode.loglikelihoods` call for the whole
    list — length-bucketed batches, so few shapes compile. Too long inputs keep their last `max_length + 1` tokens.
  - `loglikelihood_rolling`: the text's tokens (no BOS) in disjoint windows of `max_length` with the prefix token
    (BOS, else EOS) before the first, as lm-eval defines it; all windows of all requests go out as one batch.
  - `generate_until`: requests grouped by (temperature, top_p, max_gen_toks), each group one `decode.generate`
    call with per-row stop strings; prompts keep their last `max_length - max_gen_toks` tokens. Sampling streams
    are keyed by (hash of the request, occurrence), so lm-eval's `repeats` give distinct samples and results do
    not depend on batching.
  - chat template (`--apply_chat_template`): ptm's Tulu template, rendered as text with EOS after each assistant
    turn marked `CHAT_EOS` (turned into the EOS id when encoding), and encoded in the same chunks as
    `ptm.data.chat`, so a prompt is token-for-token what training saw.

Multi-host: every process runs the harness on the same task files (lm-eval is deterministic given its seeds) and
reports rank 0 of world size 1, so lm-eval never splits requests. Given a jax Mesh over every process's devices
(`ptm eval`, `ptm experiment`), every process makes the same `ptm.eval.decode` calls on it, computes its own rows
and gets every result by an all-gather: the model stays sharded over the hosts and every process ends with the
numbers of one process on that mesh. A `mesh=DATAxFSDPxTENSOR` model_arg (lm-eval's own CLI, `ptm lm-eval`, where
nothing else coordinates the processes) is built over each process's *local* devices instead, and each process
holds the whole model. Only process 0 should print or write results (`ptm eval` does that). See
docs/multihost.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptm.errors import ConfigError, PtmError

try:
    import lm_eval
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _e:  # pragma: no cover - exercised in a subprocess without lm-eval
    raise PtmError(
        "ptm.eval.lm_eval_model needs lm-evaluation-harness 0.4.x, an optional extra of ptm: "
        f"pip install 'ptm[lm_eval]' (or pip install 'lm-eval>=0.4,<0.5'); import failed: {_e}"
    ) from None

LM_EVAL_VERSION = getattr(lm_eval, "__version__", "0")
CHAT_EOS = "<|eos|>"  # EOS after an assistant turn in chat-templated text; encoded as the EOS id
_ASSISTANT = "<|assistant|>\n"
_CHAT_SPLIT = re.compile(re.escape(CHAT_EOS))
MODEL_NAME = "ptm"


# -------------------------------------------------------------------------------------- helpers


def parse_mesh_spec(spec: Any):
    """`None`, a jax Mesh (used as given, e.g. one over every process), or "DATAxFSDPxTENSOR" /
    "DATA:FSDP:TENSOR" (commas are model_args separators): with several JAX processes such a spec covers this
    process's local devices (every process runs everything on its own copy)."""
    if spec is None or spec == "" or spec == "none":
        return None
    from jax.sharding import Mesh

    if isinstance(spec, Mesh):
        return spec
    parts = re.split(r"[x:,]", str(spec))
    try:
        data, fsdp, tensor = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"mesh={spec!r}: expected DATAxFSDPxTENSOR, e.g. 1x-1x1") from None
    import jax

    from ptm.parallel.mesh import MeshConfig, make_mesh

    devices = jax.local_devices() if jax.process_count() > 1 else None
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices=devices)


def tokenizer_spec(meta: dict | None) -> str:
    meta = meta or {}
    return meta.get("tokenizer") or (meta.get("provenance") or {}).get("tokenizer") or "byte"


def recipe_model(path: str, index: int = 0):
    """(name, params as numpy, ModelConfig, meta) of merge `index` of a recipe file, merged in memory."""
    from ptm.eval.merged import recipe_models

    models = list(recipe_models(path, only=index))
    return models[0]


def _as_bool(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean, got {v!r}")


def _row_hash(context: str, kwargs: dict) -> int:
    key = json.dumps([context, kwargs], sort_keys=True, default=str).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


_SAMPLING_OK = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "temperature", "top_p", "do_sample",
                "seed"}


def gen_settings(kwargs: dict, default_max: int) -> tuple[list[str], int, float, float]:
    """(stop strings, max new tokens, temperature, top_p) from lm-eval generation kwargs; anything ptm's sampler
    cannot do (top_k, beams, penalties) is refused rather than ignored."""
    kw = dict(kwargs or {})
    unknown = sorted(k for k, v in kw.items() if k not in _SAMPLING_OK and not (k == "top_k" and v in (None, 0, -1))
                     and not (k == "num_beams" and v in (None, 1)))
    if unknown:
        raise ConfigError(f"generation kwargs {unknown} are not supported by the ptm backend "
                          f"(supported: until, max_gen_toks, temperature, top_p, do_sample)")
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = kw.get("max_gen_toks", kw.get("max_new_tokens", kw.get("max_tokens", default_max)))
    do_sample = kw.get("do_sample")
    temp = float(kw.get("temperature", 0.0) or 0.0)
    if do_sample is False:
        temp = 0.0
    elif do_sample and temp <= 0:
        temp = 1.0  # transformers' default temperature when sampling without one
    top_p = float(kw.get("top_p", 1.0) if kw.get("top_p") is not None else 1.0)
    return [s for s in until if s], int(max_gen), temp, top_p


# -------------------------------------------------------------------------------------- the model


class PtmLM(TemplateLM):
    """An lm-eval LM over a ptm checkpoint, an in-memory merge recipe, or params already in memory.

    model_args (all optional except a source): checkpoint=DIR | recipe=TOML[,recipe_index=I]; tokenizer=SPEC
    (default: the checkpoint's metadata, else "byte"); batch_size (32); max_length (the model's max_seq_len);
    max_gen_toks (256); mesh=DATAxFSDPxTENSOR; dtype (compute dtype override, e.g. float32); add_bos_token
    (default: when the tokenizer has BOS); seed (0, for sampling); chunk (16 decode steps per jitted call).
    """

    backend = "causal"

    def __init__(
        self,
        checkpoint: str | None = None,
        recipe: str | None = None,
        recipe_index: int = 0,
        tokenizer: Any = None,
        batch_size: int | str | None = 32,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        mesh: Any = None,
        dtype: str | None = None,
        add_bos_token: bool | str | None = None,
        seed: int = 0,
        chunk: int = 16,
        *,
        params: Any = None,
        model_config: Any = None,
        name: str | None = None,
        meta: dict | None = None,
        max_batch_size: Any = None,
        device: Any = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise ConfigError(f"ptm lm-eval model: unknown model_args {sorted(unknown)}")
        from ptm.ckpt.params import load_checkpoint, read_model_config
        from ptm.data.tokenizers import load_tokenizer
        from ptm.eval.harness import check_vocab, place_on_mesh

        sources = sum(x is not None for x in (checkpoint, recipe, params))
        if sources != 1:
            raise ConfigError("ptm lm-eval model: give exactly one of checkpoint=, recipe= or params=")
        self.mesh = parse_mesh_spec(mesh)
        if checkpoint is not None:
            config, meta = read_model_config(str(checkpoint))
            tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(
                tokenizer or tokenizer_spec(meta))
            check_vocab(config, tok, str(checkpoint))
            params, config, meta = load_checkpoint(str(checkpoint), self.mesh)
            name = name or str(checkpoint)
        elif recipe is not None:
            name, params, config, meta = recipe_model(str(recipe), int(recipe_index))
            tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(
                tokenizer or tokenizer_spec(meta))
            check_vocab(config, tok, name)
        else:
            if model_config is None or tokenizer is None:
                raise ConfigError("ptm lm-eval model: params= needs model_config= and tokenizer=")
            config = model_config
            tok = tokenizer if not isinstance(tokenizer, str) else load_tokenizer(tokenizer)
            check_vocab(config, tok, name or "params")
        if dtype:
            config = dataclasses.replace(config, dtype=str(dtype))
        if self.mesh is not None:  # numpy leaves (an in-memory merge) sliced per device: fine across processes
            params = place_on_mesh(params, config, self.mesh)
        else:  # once, not on every jitted call (an in-memory merge is a tree of numpy arrays)
            import jax

            params = jax.device_put(params)
        self.params, self.config, self.tok, self.meta = params, config, tok, meta or {}
        self.name = name or "params"
        if batch_size is None or str(batch_size).startswith("auto"):
            batch_size = 32
        self.batch_size_ = int(batch_size)
        self.max_length_ = int(max_length or config.max_seq_len)
        if self.max_length_ > config.max_seq_len:
            raise ConfigError(f"max_length={self.max_length_} exceeds the model's max_seq_len={config.max_seq_len}")
        self.max_gen_toks_ = int(max_gen_toks)
        bos = _as_bool(add_bos_token)
        self.add_bos_token = (tok.bos_id is not None) if bos is None else (bos and tok.bos_id is not None)
        self.seed, self.chunk = int(seed), int(chunk)
        self.timings: dict[str, float] = {}

    @classmethod
    def from_params(cls, params, model_config, tokenizer, **kw) -> PtmLM:
        """From an in-memory tree (a trained or merged model) without touching disk."""
        return cls(params=params, model_config=model_config, tokenizer=tokenizer, **kw)

    # ---------------------------------------------------------------- lm-eval properties

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id)

    @property
    def max_length(self) -> int:
        return self.max_length_

    @property
    def max_gen_toks(self) -> int:
        return self.max_gen_toks_

    @property
    def batch_size(self) -> int:
        return self.batch_size_

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "tulu" if chat_template else None

    def get_model_info(self) -> dict:
        return {"model_name": self.name, "model_dtype": self.config.dtype, "tokenizer": self.tok.name,
                "max_length": self.max_length_, "ptm_backend": "ptm.eval.decode"}

    # ---------------------------------------------------------------- tokenisation

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        segments = _CHAT_SPLIT.split(text)
        for j, seg in enumerate(segments):
            # Split after each assistant marker: the chunks ptm.data.chat encodes separately.
            pieces = seg.split(_ASSISTANT)
            for i, p in enumerate(pieces):
                chunk = p + (_ASSISTANT if i < len(pieces) - 1 else "")
                if chunk:
                    ids.extend(self.tok.encode(chunk))
            if j < len(segments) - 1:
                ids.append(int(self.tok.eos_id))
        return ids

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        ids = self._encode_text(string)
        if self.add_bos_token and add_special_tokens is not False:
            ids = [int(self.tok.bos_id)] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tok.decode(list(tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """ptm's Tulu template as text: `<|role|>\\n{content}\\n` turns, CHAT_EOS after each assistant reply;
        a final `<|assistant|>\\n` (or, without add_generation_prompt, the last assistant turn left open)."""
        out = []
        n = len(chat_history)
        for i, m in enumerate(chat_history):
            role, content = m.get("role"), m.get("content", "")
            if role not in ("system", "user", "assistant"):
                raise ConfigError(f"chat template: unknown role {role!r}")
            if role == "assistant":
                if i == n - 1 and not add_generation_prompt:
                    out.append(_ASSISTANT + content)  # a prefilled reply the model continues
                else:
                    out.append(_ASSISTANT + content + CHAT_EOS + "\n")
            else:
                out.append(f"<|{role}|>\n{content}\n")
        if add_generation_prompt:
            out.append(_ASSISTANT)
        return "".join(out)

    # ---------------------------------------------------------------- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from ptm.eval.decode import loglikelihoods

        cap = self.max_length_ + 1
        pairs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ConfigError("loglikelihood request with an empty continuation")
            full = list(ctx) + list(cont)
            cut = max(0, len(full) - cap)  # keep the last max_length + 1 tokens, as lm-eval's hf backend does
            kept, nctx = full[cut:], max(len(ctx) - cut, 1)
            pairs.append((kept[:nctx], kept[nctx:]))
        t0 = time.perf_counter()
        out = loglikelihoods(self.params, self.config, self.tok, pairs, batch_size=self.batch_size_, mesh=self.mesh)
        self.timings["loglikelihood_s"] = self.timings.get("loglikelihood_s", 0.0) + time.perf_counter() - t0
        res = []
        for (req_str, _, _), (ll, _, greedy) in zip(requests, out, strict=True):
            ans = (float(ll), bool(greedy))
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, ans)
            res.append(ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from ptm.eval.decode import loglikelihoods

        pairs, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args[:1]
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length_, context_len=1)
            for ctx, pred in map(lm_utils.make_disjoint_window, windows):
                pairs.append((list(ctx), list(pred)))
                owner.append(k)
        t0 = time.perf_counter()
        out = loglikelihoods(self.params, self.config, self.tok, pairs, batch_size=self.batch_size_, mesh=self.mesh)
        self.timings["loglikelihood_s"] = self.timings.get("loglikelihood_s", 0.0) + time.perf_counter() - t0
        totals = [0.0] * len(requests)
        for k, (ll, _, _) in zip(owner, out, strict=True):
            totals[k] += float(ll)
        for req, tot in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), tot)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ptm.eval.decode import GenerationConfig, generate

        groups: dict[tuple, list[int]] = {}
        settings, seen = [], {}
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {})
            until, max_gen, temp, top_p = gen_settings(kwargs, self.max_gen_toks_)
            if max_gen < 1 or max_gen >= self.max_length_:
                raise ConfigError(f"max_gen_toks={max_gen} must be in [1, max_length={self.max_length_})")
            h = _row_hash(context, kwargs)
            occ = seen.get(h, 0)
            seen[h] = occ + 1
            settings.append((context, until, max_gen, h, occ))
            groups.setdefault((temp, top_p, max_gen), []).append(i)
        results: list[str | None] = [None] * len(requests)
        t0 = time.perf_counter()
        for (temp, top_p, max_gen), idx in groups.items():
            prompts = [self.tok_encode(settings[i][0], left_truncate_len=self.max_length_ - max_gen) for i in idx]
            gen = GenerationConfig(max_new_tokens=max_gen, temperature=temp, top_p=top_p, seed=self.seed,
                                   chunk=self.chunk)
            outs = generate(self.params, self.config, self.tok, prompts, gen, batch_size=self.batch_size_,
                            mesh=self.mesh, stops=[tuple(settings[i][1]) for i in idx],
                            row_ids=[(settings[i][3], settings[i][4]) for i in idx])
            for i, g in zip(idx, outs, strict=True):
                results[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        self.timings["generate_s"] = self.timings.get("generate_s", 0.0) + time.perf_counter() - t0
        return results  # type: ignore[return-value]


# lm-eval fills its registry with the built-in backends (lazy placeholders, no torch import) only when the registry
# is empty at the first lookup; a plugin registered first would hide them ("no model hf"), so load them first.
import lm_eval.models  # noqa: E402, F401

try:  # @register_model("ptm"); a second copy (`python -m` runs this file as __main__ too) keeps the first
    register_model(MODEL_NAME)(PtmLM)
except ValueError:
    pass


# -------------------------------------------------------------------------------------- offline tasks

_PLACEHOLDER = re.compile(r"\$\{(PTM_[A-Z0-9_]+|TASK_DIR)\}")
DATA_ENV = "PTM_LM_EVAL_DATA"
_UNSET = "/__unset__"


def stage_task_dirs(dirs: Sequence[str | os.PathLike], data: str | None = None,
                    env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Copy task-YAML directories to a temporary directory with placeholders filled in, so `data_files` can be
    relative to something stable: `${PTM_LM_EVAL_DATA}` = `data` (ptm eval --lm-eval-data) or that environment
    variable, `${TASK_DIR}` = the YAML's own (original) directory, `${PTM_<NAME>}` = that environment variable.
    An unset variable becomes `/__unset__/NAME` (the dataset loader's file-not-found error then names it).
    Returns (temporary root to delete afterwards, staged directories)."""
    env = dict(os.environ if env is None else env)
    if data is not None:
        env[DATA_ENV] = str(Path(data).resolve())
    root = Path(tempfile.mkdtemp(prefix="ptm-lm-eval-tasks-"))
    staged = []
    for i, d in enumerate(dirs):
        src = Path(d).resolve()
        if not src.is_dir():
            shutil.rmtree(root, ignore_errors=True)
            raise ConfigError(f"--lm-eval-include {d}: not a directory")
        dst = root / f"{i:02d}-{src.name}"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for y in sorted([*dst.rglob("*.yaml"), *dst.rglob("*.yml")]):
            orig_dir = src / y.parent.relative_to(dst)

            def sub(m, orig_dir=orig_dir):
                name = m.group(1)
                if name == "TASK_DIR":
                    return str(orig_dir)
                return env.get(name) or f"{_UNSET}/{name}"

            text = y.read_text()
            new = _PLACEHOLDER.sub(sub, text)
            if new != text:
                y.write_text(new)
        staged.append(str(dst))
    return str(root), staged


def task_manager(include: Sequence[str], tasks: Sequence[str]):
    """lm-eval's TaskManager: only the include dirs when they define every requested name (indexing lm-eval's
    ~15k built-in task YAMLs takes ~10 s), else the built-ins too."""
    from lm_eval.tasks import TaskManager

    if include:
        try:
            tm = TaskManager(include_path=list(include), include_defaults=False)
            if all(t in tm.all_tasks for t in tasks):
                return tm
        except TypeError:  # an lm-eval 0.4.x without include_defaults
            pass
    return TaskManager(include_path=list(include) or None)


@contextlib.contextmanager
def _light_env_info():
    """lm-eval records its environment with torch's collect_env when torch is importable, which runs `pip list`
    and more (~1.3 s per call here, most of lm-eval's own time on a small suite); record versions only."""
    import lm_eval.evaluator as ev

    orig = getattr(ev, "add_env_info", None)
    if orig is None:
        yield
        return

    def light(storage: dict) -> None:
        import importlib.metadata as md

        def ver(name):
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return "N/A"

        storage.update({"pretty_env_info": "not collected (ptm: torch.utils.collect_env skipped)",
                        "transformers_version": ver("transformers"), "lm_eval_version": ver("lm_eval"),
                        "upper_git_hash": None, "ptm_jax_version": ver("jax")})

    ev.add_env_info = light
    try:
        yield
    finally:
        ev.add_env_info = orig


def simple_evaluate(lm: PtmLM, tasks: Sequence[str], *, include: Sequence[str] = (), data: str | None = None,
                    num_fewshot: int | None = None, apply_chat_template: bool = False, limit: int | float | None = None,
                    allow_code_execution: bool = False, log_samples: bool = False, seed: int = 0,
                    bootstrap_iters: int = 1000, gen_kwargs: str | None = None,
                    split: str | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate over local task files (placeholders staged, see stage_task_dirs); offline
    unless a task itself points at a hub dataset. `split` ("validation" / "test", see `select_split`) pins the
    documents scored; None keeps lm-eval's rule (test if the task has one, else validation). Returns lm-eval's
    results dict (plus `ptm_timings`)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ConfigError("no lm-eval tasks given")
    root, staged = stage_task_dirs(include, data) if include else (None, [])
    try:
        tm = task_manager(staged, tasks)
        unknown = [t for t in tasks if t not in tm.all_tasks and not os.path.exists(t)]
        if unknown:
            raise ConfigError(f"unknown lm-eval task(s) {unknown}"
                              + ("" if include else " (local task YAMLs need --lm-eval-include DIR)"))
        todo: list[Any] = list(tasks) if split is None else select_split(tm, tasks, split)
        t0 = time.perf_counter()
        try:
            with _light_env_info():
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=todo, task_manager=tm, num_fewshot=num_fewshot,
                    apply_chat_template=apply_chat_template, limit=limit,
                    confirm_run_unsafe_code=allow_code_execution, log_samples=log_samples, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                    bootstrap_iters=bootstrap_iters, gen_kwargs=gen_kwargs)
        except FileNotFoundError as e:
            if _UNSET in str(e):
                raise ConfigError(f"{e}\n(a task's data_files uses ${{{DATA_ENV}}}: pass --lm-eval-data DIR or "
                                  f"export {DATA_ENV}=DIR)") from None
            raise
        if res is not None:
            res["ptm_timings"] = {"total_s": time.perf_counter() - t0, **lm.timings}
        return res
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)


SPLITS = ("validation", "test")


def _split_files(task: Any, split: str) -> Any:
    files = (task.config.dataset_kwargs or {}).get("data_files")
    return files.get(split) if isinstance(files, dict) else None


def select_split(tm: Any, names: Sequence[str], split: str) -> list[Any]:
    """The built tasks/groups `names`, every leaf task set to score its `split` documents.

    An experiment selects models on validation and reports test, so the two must be different documents:
    "validation" needs the task's `validation_split` (its test split is switched off), "test" its `test_split`;
    a task without that split, or whose two splits name the same data files, is refused (ConfigError naming the
    task) rather than silently scoring something else -- lm-eval alone would fall back to validation docs."""
    if split not in SPLITS:
        raise ConfigError(f"lm-eval split {split!r}: expected one of {SPLITS}")
    out = []
    for name in names:
        loaded = tm.load([name])
        obj = loaded["groups"].get(name) or loaded["tasks"].get(name)
        if obj is None:
            raise ConfigError(f"lm-eval task {name!r}: not found after loading")
        for tname, task in loaded["tasks"].items():
            cfg = task.config
            val, test = cfg.validation_split, cfg.test_split
            where = f"lm-eval task {tname}" + (f" (in {name})" if tname != name else "")
            if val is None or test is None:
                missing = "validation_split" if val is None else "test_split"
                raise ConfigError(
                    f"{where}: has no {missing}; a study selects on validation and reports test, so it needs both "
                    "(stage a held-out file and name it in the task YAML: docs/experiment.md, 'lm-eval tasks')")
            if val == test or (_split_files(task, val) is not None
                               and _split_files(task, val) == _split_files(task, test)):
                raise ConfigError(f"{where}: validation_split and test_split are the same data "
                                  f"({_split_files(task, val) or val}); selection would see the test set")
            if split == "validation":
                task.set_config(key="test_split", value=None)  # lm-eval scores test docs whenever they exist
        out.append(obj)
    return out


def headline(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of an lm-eval results dict, numbers only (stderr entries dropped)."""
    out = {}
    for task, ms in (results.get("results") or {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in ms.items()
                     if isinstance(v, int | float) and not isinstance(v, bool) and "_stderr" not in k}
    return out


# -------------------------------------------------------------------------------------- hook for experiments

SPEC_PREFIX = "lm_eval:"
METRIC_PREFERENCE = ("acc", "exact_match", "acc_norm", "mc2", "f1", "pass@1", "bleu")


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """`lm_eval:TASK` or `lm_eval:TASK:METRIC[,FILTER]` -> (task, metric key or None = the default)."""
    if not spec.startswith(SPEC_PREFIX):
        raise ConfigError(f"{spec!r} is not an lm-eval task spec ({SPEC_PREFIX}TASK[:METRIC])")
    task, _, metric = spec[len(SPEC_PREFIX):].partition(":")
    if not task:
        raise ConfigError(f"{spec!r}: no task name")
    return task, metric or None


def pick_metric(task_metrics: dict[str, float], metric: str | None) -> tuple[str, float]:
    """The headline (name, value) of one task's lm-eval metrics (keys like "acc,none" or "exact_match,strict-match")."""
    if metric:
        key = metric if "," in metric else f"{metric},none"
        cands = [k for k in task_metrics if k == key or (k.split(",")[0] == metric and "," not in metric)]
        if not cands:
            raise ConfigError(f"metric {metric!r} not in {sorted(task_metrics)}")
        return cands[0], float(task_metrics[cands[0]])
    for m in METRIC_PREFERENCE:
        for k, v in task_metrics.items():
            if k.split(",")[0] == m and "_stderr" not in k and isinstance(v, int | float):
                return k, float(v)
    raise ConfigError(f"no headline metric among {sorted(task_metrics)}; name one: lm_eval:TASK:METRIC")


def score_task_specs(params, config, tokenizer, specs: Sequence[str], *, include: Sequence[str] = (),
                     data: str | None = None, apply_chat_template: bool = True, num_fewshot: int | None = None,
                     batch_size: int = 32, mesh=None, limit=None, seed: int = 0, split: str | None = None,
                     max_gen_toks: int = 256, name: str | None = None) -> dict[str, dict[str, Any]]:
    """For experiment configs: score `lm_eval:TASK[:METRIC]` specs of one model in one lm-eval run on `split`
    (see `select_split`; None: lm-eval's default documents). Returns {spec: {"score": float, "metric": key,
    "task": name, "n": docs, "higher_is_better": lm-eval's flag or None}}; groups (mmlu, bbh) report their
    aggregate."""
    parsed = {s: parse_task_spec(s) for s in specs}
    lm = PtmLM.from_params(params, config, tokenizer, batch_size=batch_size, mesh=mesh, seed=seed,
                           max_gen_toks=max_gen_toks, name=name)
    res = simple_evaluate(lm, sorted({t for t, _ in parsed.values()}), include=include, data=data,
                          num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, limit=limit, seed=seed,
                          split=split)
    table = {**(res.get("results") or {}), **(res.get("groups") or {})}
    out = {}
    for spec, (task, metric) in parsed.items():
        if task not in table:
            raise ConfigError(f"{spec}: lm-eval returned no results for {task!r}")
        key, val = pick_metric({k: v for k, v in table[task].items() if k != "alias"}, metric)
        hib = (res.get("higher_is_better") or {}).get(task, {}).get(key.split(",")[0])
        out[spec] = {"score": val, "metric": key, "task": task, "n": (res.get("n-samples") or {}).get(task, {}),
                     "higher_is_better": hib}
    return out


def format_results(name: str, results: dict[str, Any]) -> str:
    try:
        table = lm_utils.make_table(results)
    except Exception:  # a results dict lm-eval's table code does not like: fall back to our own lines
        table = "\n".join(f"{t}: " + ", ".join(f"{k}={v:.4f}" for k, v in ms.items())
                          for t, ms in headline(results).items())
    return f"== {name} (lm-eval {LM_EVAL_VERSION})\n{table}"


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's own command line with the `ptm` model registered (`ptm lm-eval ...`, `python -m
    ptm.eval.lm_eval_model ...`); --include_path directories get their placeholders staged first."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    root = None
    for i, a in enumerate(argv):
        if a == "--include_path" and i + 1 < len(argv):
            root, staged = stage_task_dirs(argv[i + 1].split(","))
            argv[i + 1] = ",".join(staged)
        elif a.startswith("--include_path="):
            root, staged = stage_task_dirs(a.split("=", 1)[1].split(","))
            argv[i] = "--include_path=" + ",".join(staged)
    try:
        from lm_eval.__main__ import cli_evaluate

        old = sys.argv
        sys.argv = ["lm_eval", *argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = old
        return 0
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
