"""Experiment configs: one TOML file declares the whole CFT / RT / PTM study (see docs/experiment.md).

Parsing is strict (unknown keys, wrong types and inconsistent sizes raise ConfigError naming the file and the
key) and has no side effects: nothing is read from the data paths, so a config for another machine (the
paper's 7B setting on a TPU pod) can be checked anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ptm.errors import ConfigError
from ptm.experiment import task_specs
from ptm.model.config import ModelConfig, from_spec
from ptm.parallel.mesh import MeshConfig
from ptm.toml_file import load_toml
from ptm.toy import suite as toy

RUN_KINDS = ("pretrain", "general", "skill", "cft", "rt")
MERGE_METHODS = ("task_arithmetic", "linear_interpolation", "wise_ft")
MULTI_METHODS = ("task_arithmetic", "ties", "dare")
SELECTIONS = ("skill", "mean")


@dataclass(frozen=True)
class Hyper:
    """Per run kind: how long and how fast it trains."""

    epochs: int = 2
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainSpec:
    seq_len: int = 4096
    global_batch_size: int = 128
    save_every: int = 500
    grad_accum_steps: int = 1
    seed: int = 0
    pack: bool = True
    kinds: dict[str, Hyper] = field(default_factory=lambda: {k: Hyper() for k in RUN_KINDS})


@dataclass(frozen=True)
class SuiteSpec:
    """The built-in toy suite, generated into `<results>/suite` (ptm.toy.suite.generate_suite)."""

    seed: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseSpec:
    checkpoint: str | None = None  # theta_pre given ...
    data: str | None = None  # ... or pretrained here on this corpus
    examples: int | None = None

    @property
    def pretrain(self) -> bool:
        return self.checkpoint is None


@dataclass(frozen=True)
class GeneralSpec:
    data: str
    examples: int | None = None  # |G| (None: the whole file)
    checkpoint: str | None = None  # an existing theta_G (then RT still trains on `data`)


@dataclass(frozen=True)
class SkillSpec:
    name: str
    data: str
    sizes: tuple[int, ...]  # D_i of the CFT / RT grid
    examples: int | None  # |D| of the skill run (PTM); None: the whole file
    tasks: tuple[str, ...]  # eval tasks whose mean is the skill score
    benign_tasks: tuple[str, ...] = ()  # comply-rate tasks (exaggerated refusals)


@dataclass(frozen=True)
class LmEvalSpec:
    """`lm_eval:TASK` tasks ([eval.lm_eval]): where the task YAMLs and their data are (docs/eval.md)."""

    include: tuple[str, ...] = ()  # task YAML directories (config paths: $VARS, relative to data_root)
    data: str | None = None  # fills ${PTM_LM_EVAL_DATA} in them
    num_fewshot: int | None = None  # None: each task's own
    chat_template: bool = True  # ptm's models are chat models
    max_gen_toks: int = 256  # for generation tasks that set none


@dataclass(frozen=True)
class CodeSpec:
    """`humaneval` / `code:FILE` tasks ([eval.code]): sampled completions executed in ptm's sandbox."""

    allow_code_execution: bool = False  # generated code runs only with this explicit opt-in
    samples: int = 20  # n per problem (the paper: 20)
    k: int = 10  # the task score is pass@k (the paper: pass@10)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    prompt: str = "completion"  # or "chat" (ptm.eval.code_exec.code_prompt_ids)
    stops: tuple[str, ...] | None = None  # None: the Codex stop sequences
    timeout_s: float = 10.0
    workers: int | None = None
    humaneval_validation: str | None = None  # problems for `humaneval` on validation (HumanEval is a test set)


@dataclass(frozen=True)
class EvalSpec:
    validation: str
    test: str
    general_tasks: tuple[str, ...]
    max_items_per_task: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 32
    test_all: bool = False  # evaluate every model on test (else: only the reported ones)
    lm_eval: LmEvalSpec = field(default_factory=LmEvalSpec)
    code: CodeSpec = field(default_factory=CodeSpec)


@dataclass(frozen=True)
class MergeSpec:
    omegas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    methods: tuple[str, ...] = MERGE_METHODS
    heuristic: bool = True
    multi_skill: bool = True
    multi_methods: tuple[str, ...] = ("task_arithmetic",)
    pairwise: bool = True
    density: float = 0.5  # TIES (multi-skill only)
    drop_rate: float = 0.3  # DARE (multi-skill only)


@dataclass(frozen=True)
class BaselineSpec:
    """Table 4's CFT(all) and RT(all) rows need extra runs on the union of all skills (full sizes)."""

    cft_all: bool = False
    rt_all: bool = False


@dataclass(frozen=True)
class SeqioSpec:
    """`[seqio]`: how `seqio:NAME` data, tokenizer and eval specs are read (the optional seqio extra).

    In the study a seqio LM Task is read as examples into ptm's planner (DataConfig.seqio_lm = "examples"), so
    D_i subsets, RT's G + D_i mixtures and the example counts work exactly as for JSONL."""

    modules: tuple[str, ...] = ()  # Python modules that register the Tasks/Mixtures (t5x MIXTURE_OR_TASK_MODULE)
    split: str = "train"  # the training split of every seqio source
    use_cached: bool = False  # t5x USE_CACHED_TASKS


def is_seqio(path: Any) -> bool:
    return isinstance(path, str) and path.startswith("seqio:")


def uses_seqio(cfg: ExperimentConfig) -> bool:
    """Does any data, tokenizer or eval entry name a seqio Task/Mixture (`seqio:NAME`)?"""
    entries = (cfg.base.data, cfg.general.data, *(s.data for s in cfg.skills), cfg.tokenizer,
               cfg.eval.validation, cfg.eval.test)
    return any(is_seqio(p) for p in entries)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    source: str  # the TOML file
    results_dir: str
    data_root: str | None  # relative data paths resolve against it (default: the suite, else the TOML's dir)
    suite: SuiteSpec | None
    base: BaseSpec
    general: GeneralSpec
    skills: tuple[SkillSpec, ...]
    eval: EvalSpec
    merge: MergeSpec
    baselines: BaselineSpec
    model: ModelConfig
    mesh: MeshConfig
    train: TrainSpec
    tokenizer: str = "byte"
    selection: str = "skill"
    compilation_cache: bool = True
    seqio: SeqioSpec = SeqioSpec()

    def skill(self, name: str) -> SkillSpec:
        for s in self.skills:
            if s.name == name:
                return s
        raise ConfigError(f"{self.source}: no skill {name!r}")

    def resolve(self, path: str) -> str:
        """A data/eval path from the config, absolute (env vars expanded; gs:// kept)."""
        if is_seqio(path):  # a registered seqio Task/Mixture, not a file
            return path
        p = os.path.expandvars(os.path.expanduser(path))
        if "$" in p:
            raise ConfigError(f"{self.source}: path {path!r} uses an unset environment variable")
        if p.startswith("gs://") or os.path.isabs(p):
            return p
        root = self.data_root_dir()
        return f"{root.rstrip('/')}/{p}" if root.startswith("gs://") else os.path.join(root, p)

    def tokenizer_spec(self) -> str:
        """The tokenizer for ptm.data.tokenizers.load_tokenizer: "byte", or a resolved path."""
        return "byte" if self.tokenizer == "byte" else self.resolve(self.tokenizer)  # seqio:NAME stays as is

    def data_root_dir(self) -> str:
        if self.data_root is not None:
            r = os.path.expandvars(os.path.expanduser(self.data_root))
            if r.startswith("gs://") or os.path.isabs(r):
                return r
            return os.path.join(os.path.dirname(os.path.abspath(self.source)), r)
        if self.suite is not None:
            return os.path.join(self.results_dir, "suite")
        return os.path.dirname(os.path.abspath(self.source))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- parsing helpers


class _Table:
    """A TOML table with typed getters that name `file: key` in every error and reject unknown keys."""

    def __init__(self, d: Any, where: str, src: str):
        if not isinstance(d, dict):
            raise ConfigError(f"{src}: [{where}] must be a table, got {type(d).__name__}")
        self.d, self.where, self.src = d, where, src
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.src}: {self.where + '.' if self.where else ''}{k}"

    def has(self, k: str) -> bool:
        return k in self.d

    def get(self, k: str, types: type | tuple[type, ...], default: Any = ..., *, check=None, what: str = ""):
        self.used.add(k)
        if k not in self.d:
            if default is ...:
                raise ConfigError(f"{self.key(k)}: missing (required)")
            return default
        v = self.d[k]
        types = types if isinstance(types, tuple) else (types,)
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if float in types and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok or (check is not None and not check(v)):
            raise ConfigError(
                f"{self.key(k)}: expected {what or '/'.join(t.__name__ for t in types)}, got {v!r}"
            )
        return v

    def table(self, k: str, required: bool = False) -> _Table:
        self.used.add(k)
        if k not in self.d:
            if required:
                raise ConfigError(
                    f"{self.key(k)}: missing table [{self.where + '.' if self.where else ''}{k}]"
                )
            return _Table({}, f"{self.where + '.' if self.where else ''}{k}", self.src)
        return _Table(self.d[k], f"{self.where + '.' if self.where else ''}{k}", self.src)

    def str_list(self, k: str, default: Any = ...) -> tuple[str, ...]:
        v = self.get(k, list, default if default is ... else list(default))
        if not all(isinstance(x, str) and x for x in v):
            raise ConfigError(f"{self.key(k)}: expected a list of non-empty strings, got {v!r}")
        return tuple(v)

    def done(self) -> None:
        extra = sorted(set(self.d) - self.used)
        if extra:
            raise ConfigError(f"{self.key(extra[0])}: unknown key(s) {extra}")


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and v > 0


def _opt_pos_int(t: _Table, k: str) -> int | None:
    return t.get(k, int, None, check=_pos_int, what="a positive integer")


def _hyper(t: _Table, base: Hyper) -> Hyper:
    h = Hyper(
        epochs=t.get("epochs", int, base.epochs, check=_pos_int, what="a positive integer"),
        learning_rate=t.get(
            "learning_rate", float, base.learning_rate, check=lambda v: v > 0, what="a positive number"
        ),
        warmup_ratio=t.get(
            "warmup_ratio", float, base.warmup_ratio, check=lambda v: 0 <= v < 1, what="a number in [0, 1)"
        ),
        weight_decay=t.get(
            "weight_decay", float, base.weight_decay, check=lambda v: v >= 0, what="a non-negative number"
        ),
    )
    return h


def _train(t: _Table) -> TrainSpec:
    default = _hyper(t, Hyper())
    kinds = {}
    for k in RUN_KINDS:
        sub = t.table(k)
        kinds[k] = _hyper(sub, default)
        sub.done()
    spec = TrainSpec(
        seq_len=t.get("seq_len", int, 4096, check=_pos_int, what="a positive integer"),
        global_batch_size=t.get("global_batch_size", int, 128, check=_pos_int, what="a positive integer"),
        save_every=t.get("save_every", int, 500, check=_pos_int, what="a positive integer"),
        grad_accum_steps=t.get("grad_accum_steps", int, 1, check=_pos_int, what="a positive integer"),
        seed=t.get("seed", int, 0),
        pack=t.get("pack", bool, True),
        kinds=kinds,
    )
    t.done()
    if spec.global_batch_size % spec.grad_accum_steps:
        raise ConfigError(
            f"{t.key('global_batch_size')}: {spec.global_batch_size} is not divisible by "
            f"grad_accum_steps={spec.grad_accum_steps}"
        )
    return spec


def _model(top: _Table) -> ModelConfig:
    """`model = "PRESET"` (ptm/gin/models/PRESET.gin), or a [model] table: `preset = "..."` plus fields to change,
    or every field of a model no preset describes."""
    top.used.add("model")
    if "model" not in top.d:
        return ModelConfig()
    return from_spec(top.d["model"], f"{top.src}: [model]")


def _mesh(t: _Table) -> MeshConfig:
    m = MeshConfig(data=t.get("data", int, 1), fsdp=t.get("fsdp", int, -1), tensor=t.get("tensor", int, 1))
    t.done()
    sizes = [m.data, m.fsdp, m.tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{t.src}: [mesh]: sizes must be positive, with at most one -1, got {sizes}")
    return m


def _seqio(t: _Table) -> SeqioSpec:
    spec = SeqioSpec(
        modules=t.str_list("modules", ()),
        split=t.get("split", str, "train", check=bool, what="a split name"),
        use_cached=t.get("use_cached", bool, False),
    )
    t.done()
    return spec


def _skill(name: str, t: _Table) -> SkillSpec:
    examples = _opt_pos_int(t, "examples")
    sizes = t.get("sizes", list, [])
    if not all(_pos_int(s) for s in sizes):
        raise ConfigError(f"{t.key('sizes')}: expected a list of positive integers (the D_i), got {sizes!r}")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"{t.key('sizes')}: repeated size in {sizes}")
    if examples is not None and any(s > examples for s in sizes):
        raise ConfigError(f"{t.key('sizes')}: {sizes} has a D_i larger than the skill's examples={examples}")
    s = SkillSpec(
        name=name,
        data=t.get("data", str),
        sizes=tuple(sorted(sizes)),
        examples=examples,
        tasks=t.str_list("tasks"),
        benign_tasks=t.str_list("benign_tasks", ()),
    )
    t.done()
    if not s.tasks:
        raise ConfigError(f"{t.key('tasks')}: a skill needs at least one eval task")
    return s


def _omega_list(t: _Table, k: str, default: tuple[float, ...]) -> tuple[float, ...]:
    v = t.get(k, list, list(default))
    if not v or not all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 2 for x in v):
        raise ConfigError(f"{t.key(k)}: expected a non-empty list of numbers in [0, 2], got {v!r}")
    return tuple(float(x) for x in v)


def _lm_eval(t: _Table) -> LmEvalSpec:
    spec = LmEvalSpec(
        include=t.str_list("include", ()),
        data=t.get("data", str, None),
        num_fewshot=t.get("num_fewshot", int, None, check=lambda v: v >= 0, what="a non-negative integer"),
        chat_template=t.get("chat_template", bool, True),
        max_gen_toks=t.get("max_gen_toks", int, 256, check=_pos_int, what="a positive integer"),
    )
    t.done()
    return spec


def _code(t: _Table) -> CodeSpec:
    stops = t.get("stops", list, None)
    if stops is not None and not all(isinstance(x, str) and x for x in stops):
        raise ConfigError(f"{t.key('stops')}: expected a list of non-empty strings, got {stops!r}")
    spec = CodeSpec(
        allow_code_execution=t.get("allow_code_execution", bool, False),
        samples=t.get("samples", int, 20, check=_pos_int, what="a positive integer"),
        k=t.get("k", int, 10, check=_pos_int, what="a positive integer"),
        temperature=t.get("temperature", float, 0.8, check=lambda v: v >= 0, what="a non-negative number"),
        top_p=t.get("top_p", float, 0.95, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"),
        max_new_tokens=t.get("max_new_tokens", int, 512, check=_pos_int, what="a positive integer"),
        prompt=t.get("prompt", str, "completion", check=lambda v: v in ("completion", "chat"),
                     what="'completion' or 'chat'"),
        stops=None if stops is None else tuple(stops),
        timeout_s=t.get("timeout_s", float, 10.0, check=lambda v: v > 0, what="a positive number"),
        workers=_opt_pos_int(t, "workers"),
        humaneval_validation=t.get("humaneval_validation", str, None),
    )
    t.done()
    if spec.k > spec.samples:
        raise ConfigError(f"{t.key('k')}: pass@{spec.k} needs at least k samples, got samples={spec.samples}")
    return spec


def _check_task_specs(skills: list[SkillSpec], ev: EvalSpec, src: str) -> None:
    """Every task name parses, and code tasks have what they need before anything runs."""
    named = [("eval.general_tasks", t) for t in ev.general_tasks]
    for s in skills:
        named += [(f"skills.{s.name}.tasks", t) for t in s.tasks]
        named += [(f"skills.{s.name}.benign_tasks", t) for t in s.benign_tasks]
    for where, t in named:
        spec = task_specs.parse_spec(t, f"{src}: {where}")
        if spec.kind != "code":
            continue
        if not ev.code.allow_code_execution:
            raise ConfigError(
                f"{src}: {where}: {t!r} executes model-generated code (sandboxed, docs/eval.md); it runs only with "
                "an explicit opt-in: set [eval.code] allow_code_execution = true"
            )
        if spec.name == task_specs.HUMANEVAL and ev.code.humaneval_validation is None:
            raise ConfigError(
                f"{src}: {where}: 'humaneval' is a test set (164 problems, no validation split) and selection never "
                "looks at test: set [eval.code] humaneval_validation = FILE (HumanEval-format problems held out "
                "from it, docs/experiment.md)"
            )


def parse(d: dict[str, Any], source: str, results_dir: str | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from a parsed TOML dict (`source` names the file in errors)."""
    top = _Table(d, "", source)
    name = top.get("name", str, os.path.splitext(os.path.basename(source))[0])
    if not name or "/" in name:
        raise ConfigError(f"{source}: name: {name!r} is not a valid directory name")
    rdir = results_dir or top.get("results_dir", str, os.path.join("results", name))
    top.used.add("results_dir")
    suite = None
    if top.has("suite"):
        st = top.table("suite")
        sizes = st.get("sizes", dict, {})
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
            raise ConfigError(f"{st.key('sizes')}: expected non-negative integers, got {sizes!r}")
        suite = SuiteSpec(seed=st.get("seed", int, 0), sizes=dict(sizes))
        st.done()

    bt = top.table("base", required=True)
    base = BaseSpec(
        checkpoint=bt.get("checkpoint", str, None),
        data=bt.get("data", str, None),
        examples=_opt_pos_int(bt, "examples"),
    )
    pretrain = bt.get("pretrain", bool, base.checkpoint is None)
    bt.done()
    if pretrain == (base.checkpoint is not None) or (pretrain and not base.data):
        raise ConfigError(
            f"{source}: [base]: give either checkpoint = PATH, or pretrain = true with data = PATH"
        )

    gt = top.table("general", required=True)
    general = GeneralSpec(
        data=gt.get("data", str),
        examples=_opt_pos_int(gt, "examples"),
        checkpoint=gt.get("checkpoint", str, None),
    )
    gt.done()

    sk = top.table("skills", required=True)
    skills = []
    for sname in sk.d:
        sk.used.add(sname)
        skills.append(_skill(sname, _Table(sk.d[sname], f"skills.{sname}", source)))
    if not skills:
        raise ConfigError(f"{source}: [skills]: declare at least one skill ([skills.NAME])")

    et = top.table("eval", required=True)
    ev = EvalSpec(
        validation=et.get("validation", str),
        test=et.get("test", str),
        general_tasks=et.str_list("general_tasks"),
        max_items_per_task=_opt_pos_int(et, "max_items_per_task"),
        max_new_tokens=et.get("max_new_tokens", int, 64, check=_pos_int, what="a positive integer"),
        batch_size=et.get("batch_size", int, 32, check=_pos_int, what="a positive integer"),
        test_all=et.get("test_all", bool, False),
        lm_eval=_lm_eval(et.table("lm_eval")),
        code=_code(et.table("code")),
    )
    et.done()
    _check_task_specs(skills, ev, source)
    overlap = set(ev.general_tasks) & {t for s in skills for t in s.tasks + s.benign_tasks}
    if overlap:
        raise ConfigError(f"{source}: eval tasks {sorted(overlap)} are both general and skill tasks")

    mt = top.table("merge")
    methods = mt.str_list("methods", MERGE_METHODS)
    multi_methods = mt.str_list("multi_methods", ("task_arithmetic",))
    for k, vals, known in (
        ("methods", methods, MERGE_METHODS),
        ("multi_methods", multi_methods, MULTI_METHODS),
    ):
        bad = [m for m in vals if m not in known]
        if bad:
            raise ConfigError(f"{mt.key(k)}: unknown method(s) {bad} (known: {list(known)})")
    merge = MergeSpec(
        omegas=_omega_list(mt, "omegas", MergeSpec.omegas),
        methods=methods,
        heuristic=mt.get("heuristic", bool, True),
        multi_skill=mt.get("multi_skill", bool, True),
        multi_methods=multi_methods,
        pairwise=mt.get("pairwise", bool, True),
        density=mt.get("density", float, 0.5, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"),
        drop_rate=mt.get("drop_rate", float, 0.3, check=lambda v: 0 < v < 1, what="a number in (0, 1)"),
    )
    mt.done()
    if "task_arithmetic" not in merge.methods:
        raise ConfigError(f"{mt.key('methods')}: task_arithmetic (the paper's PTM) must be among the methods")

    blt = top.table("baselines")
    baselines = BaselineSpec(cft_all=blt.get("cft_all", bool, False), rt_all=blt.get("rt_all", bool, False))
    blt.done()

    model = _model(top)
    mesh = _mesh(top.table("mesh"))
    train = _train(top.table("train"))
    selection = top.get(
        "selection", str, "skill", check=lambda v: v in SELECTIONS, what=f"one of {SELECTIONS}"
    )
    cfg = ExperimentConfig(
        name=name,
        source=source,
        results_dir=os.path.abspath(rdir) if not rdir.startswith("gs://") else rdir,
        data_root=top.get("data_root", str, None),
        suite=suite,
        base=base,
        general=general,
        skills=tuple(skills),
        eval=ev,
        merge=merge,
        baselines=baselines,
        model=model,
        mesh=mesh,
        train=train,
        tokenizer=top.get("tokenizer", str, "byte"),
        selection=selection,
        compilation_cache=top.get("compilation_cache", bool, True),
        seqio=_seqio(top.table("seqio")),
    )
    top.done()
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: ExperimentConfig) -> None:
    """Cross-field checks that do not need data or devices."""
    src = cfg.source
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"{src}: train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    dp_fixed = math.prod(s for s in (cfg.mesh.data, cfg.mesh.fsdp) if s != -1)
    micro = cfg.train.global_batch_size // cfg.train.grad_accum_steps
    if micro % dp_fixed:
        raise ConfigError(
            f"{src}: global batch {cfg.train.global_batch_size} / grad_accum "
            f"{cfg.train.grad_accum_steps} = {micro} rows is not divisible by the mesh's "
            f"data*fsdp={dp_fixed}"
        )
    if cfg.mesh.tensor != -1 and (
        cfg.model.num_heads % cfg.mesh.tensor or cfg.model.mlp_dim % cfg.mesh.tensor
    ):
        raise ConfigError(f"{src}: [mesh] tensor={cfg.mesh.tensor} does not divide num_heads/mlp_dim")
    if cfg.tokenizer == "byte" and cfg.model.vocab_size < 259:
        raise ConfigError(f"{src}: model.vocab_size={cfg.model.vocab_size} < 259 (the byte tokenizer)")
    if cfg.suite is not None and cfg.tokenizer == toy.TOKENIZER_FILE and cfg.model.vocab_size < toy.TOKENIZER_VOCAB:
        raise ConfigError(
            f"{src}: model.vocab_size={cfg.model.vocab_size} < {toy.TOKENIZER_VOCAB}, the size of the toy "
            f"suite's {toy.TOKENIZER_FILE}"
        )
    names = [s.name for s in cfg.skills]
    if cfg.general.examples is not None:
        for s in cfg.skills:
            if s.examples is not None and s.examples > 10 * cfg.general.examples:
                raise ConfigError(
                    f"{src}: skills.{s.name}.examples={s.examples} is over 10x |G|="
                    f"{cfg.general.examples}; the heuristic omega |D|/|G| would exceed 10"
                )
    if len(set(names)) != len(names):
        raise ConfigError(f"{src}: skill names repeat: {names}")


def load(path: str, results_dir: str | None = None) -> ExperimentConfig:
    d = load_toml(path, "experiment config")
    return parse(d, path, results_dir)
