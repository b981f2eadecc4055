"""Merge recipes: what to merge, how, and where to write it (TOML files or built in code).

A recipe names its inputs by role (`pre`/`base`, `general`, `skills`, `cft`, `models`), a method from
`ptm.merge.methods.REGISTRY`, weights (`omega`/`weights`: a number, a list with one entry per weighted input,
a per-layer schedule, or "heuristic"), per-tensor overrides, method options, and the output. `sweep` turns one
recipe into several that the engine runs in a single pass over the inputs.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ptm.ckpt import format as ckpt_format
from ptm.errors import ConfigError, MergeError
from ptm.merge import methods
from ptm.toml_file import load_toml

ROLES = ("pre", "general", "skills", "cft", "models")
LIST_ROLES = ("skills", "models")
TOP_KEYS = {
    "method",
    "inputs",
    "omega",
    "weights",
    "overrides",
    "sweep",
    "out",
    "outs",
    "output_dtype",
    "output_format",
    "seed",
    "density",
    "drop_rate",
    "normalize",
    "allow_nonfinite",
    "name",
    "options",
    "convention",
    "hf_source",
    "chat_template",
    "shard_bytes",
    "slices",
    "tokenizer",
}


@dataclass
class Recipe:
    method: str
    inputs: dict[str, Any]  # role -> path, or list of paths for skills/models
    weights: Any = 1.0  # number | list | {"layers": [...]} | {"anchors": [...]} | "heuristic"
    overrides: list[dict[str, Any]] = field(default_factory=list)  # [{"pattern": ..., "weights": ...}]
    out: str | None = None
    output_dtype: str | None = None  # default: the inputs' dtype
    output_format: str | None = None  # "orbax" | "safetensors"; default: the first input's kind
    seed: int = 0
    density: float | None = None
    drop_rate: float | None = None
    normalize: bool | None = None
    allow_nonfinite: bool = False
    name: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)  # any other method option ([options] table)
    convention: str | None = None  # "ptm" (default) | "mergekit": mergekit's conventions where they differ
    hf_source: str | None = None  # safetensors output: copy config.json + tokenizer files from this model dir
    chat_template: str | None = None  # safetensors output: a Jinja chat template written as chat_template.jinja
    shard_bytes: int | None = None  # safetensors output: HF shards of at most this many bytes (+ index)
    slices: list[dict[str, Any]] | None = None  # frankenmerge: output layers from input layer ranges (merge.slices)
    tokenizer: Any = None  # "base" | "union" | an input path, or {source, tokens, pad_to_multiple_of} (merge.vocab)

    def input_paths(self) -> list[str]:
        """All input paths in a fixed role order (what the engine opens and reads)."""
        out = []
        for r in ROLES:
            v = self.inputs.get(r)
            if v is None:
                continue
            out.extend(v if isinstance(v, list) else [v])
        return out

    def options(self, method: methods.Method | None = None) -> dict[str, Any]:
        """Method options as given; with `method`, also the convention's defaults: convention "mergekit" sets
        `convention = "mergekit"` where the method has that option and the method's `mergekit_defaults` unless given
        (linear: normalize = true, ptm's default is false)."""
        out = {"density": self.density, "drop_rate": self.drop_rate, "normalize": self.normalize,
               **self.method_options}
        conv = self.convention or "ptm"
        if conv not in methods.CONVENTIONS:
            raise ConfigError(f"convention must be one of {methods.CONVENTIONS}, got {conv!r}")
        if method is not None and conv == "mergekit":
            if "convention" in method.options and out.get("convention") is None:
                out["convention"] = "mergekit"
            for k, v in method.mergekit_defaults.items():
                if out.get(k) is None:
                    out[k] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _norm_inputs(inputs: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        role = {"base": "pre", "skill": "skills", "model": "models"}.get(k, k)
        if role not in ROLES:
            raise ConfigError(
                f"{where}: unknown input role {k!r} (roles: pre/base, general, skills, cft, models)"
            )
        if role in LIST_ROLES:
            v = [v] if isinstance(v, str) else list(v)
            if not v or not all(isinstance(p, str) for p in v):
                raise ConfigError(f"{where}: inputs.{k} must be a path or a non-empty list of paths")
        elif not isinstance(v, str):
            raise ConfigError(f"{where}: inputs.{k} must be one path")
        out[role] = v
    return out


def from_dict(d: dict[str, Any], where: str = "recipe") -> list[Recipe]:
    """Build the recipe(s) of a dict (a parsed TOML file); a `sweep` list gives one recipe per value."""
    unknown = set(d) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
    if "method" not in d:
        raise ConfigError(f"{where}: missing `method`")
    if "inputs" not in d or not isinstance(d["inputs"], dict):
        raise ConfigError(f"{where}: missing [inputs] table")
    if "omega" in d and "weights" in d:
        raise ConfigError(f"{where}: give `omega` or `weights`, not both")
    overrides = []
    for i, o in enumerate(d.get("overrides", [])):
        if "pattern" not in o or not ({"omega", "weights"} & set(o)):
            raise ConfigError(f"{where}: overrides[{i}] needs `pattern` and `omega` (or `weights`)")
        overrides.append({"pattern": o["pattern"], "weights": o.get("omega", o.get("weights"))})
        check_weights(overrides[-1]["weights"], f"{where}: overrides[{i}] (pattern {o['pattern']!r})")
    check_weights(d.get("omega", d.get("weights", 1.0)), f"{where}: {'weights' if 'weights' in d else 'omega'}")
    base = Recipe(
        method=str(d["method"]),
        inputs=_norm_inputs(d["inputs"], where),
        weights=d.get("omega", d.get("weights", 1.0)),
        overrides=overrides,
        out=d.get("out"),
        output_dtype=d.get("output_dtype"),
        output_format=d.get("output_format"),
        seed=int(d.get("seed", 0)),
        density=d.get("density"),
        drop_rate=d.get("drop_rate"),
        normalize=d.get("normalize"),
        allow_nonfinite=bool(d.get("allow_nonfinite", False)),
        name=str(d.get("name", "")),
        method_options=dict(d.get("options") or {}),
        convention=d.get("convention"),
        hf_source=d.get("hf_source"),
        chat_template=d.get("chat_template"),
        shard_bytes=d.get("shard_bytes"),
        slices=d.get("slices"),
        tokenizer=d.get("tokenizer"),
    )
    if base.slices is not None:
        from ptm.merge import slices

        slices.parse(base.slices, len(base.input_paths()), base.input_paths(), where)
    if base.tokenizer is not None:
        from ptm.merge import vocab

        vocab.parse_spec(base.tokenizer, base.input_paths(), f"{where}: tokenizer")
    if "sweep" not in d:
        if "outs" in d:
            raise ConfigError(f"{where}: `outs` is only for sweeps; use `out`")
        return [base]
    return expand_sweep(base, list(d["sweep"]), d.get("outs"), where)


def expand_sweep(
    base: Recipe, values: list[Any], outs: list[str] | None = None, where: str = "recipe"
) -> list[Recipe]:
    """One recipe per weight value. Outputs come from `outs` or from `out` with `{omega}` / `{i}` in it."""
    if not values:
        raise ConfigError(f"{where}: empty sweep")
    if outs is not None and len(outs) != len(values):
        raise ConfigError(f"{where}: sweep has {len(values)} values but outs has {len(outs)} paths")
    if outs is None and base.out is not None and "{omega}" not in base.out and "{i}" not in base.out:
        raise ConfigError(f"{where}: a sweep's `out` must contain {{omega}} or {{i}} (or give `outs`)")
    for i, v in enumerate(values):
        check_weights(v, f"{where}: sweep[{i}]")
    rs = []
    for i, v in enumerate(values):
        out = outs[i] if outs is not None else (base.out.format(omega=v, i=i) if base.out else None)
        rs.append(replace(copy.deepcopy(base), weights=v, out=out, name=base.name or f"sweep[{i}]"))
    return rs


def load(path: str) -> list[Recipe]:
    d = load_toml(path, "recipe file")
    return from_dict(d, where=path)


# ------------------------------------------------------------------------------------------ weight resolution


def heuristic_omegas(recipe: Recipe, metas: dict[str, dict[str, Any] | None]) -> list[float]:
    """omega_k = |D_k| / |G| (paper Eq. 7) from `data.train_examples` in the skill and general metadata."""

    def n(path: str) -> int:
        meta = metas.get(path)
        v = ((meta or {}).get("data") or {}).get("train_examples")
        if not isinstance(v, int) or v <= 0:
            raise MergeError(
                f"{path}: omega='heuristic' needs data.train_examples in ptm/metadata "
                f"(found {v!r}); give omega explicitly"
            )
        return v

    if "general" not in recipe.inputs or "skills" not in recipe.inputs:
        raise MergeError("omega='heuristic' needs a general and at least one skill input")
    g = n(recipe.inputs["general"])
    return [n(s) / g for s in recipe.inputs["skills"]]


def input_metas(recipe: Recipe) -> dict[str, dict[str, Any] | None]:
    out = {}
    for p in recipe.input_paths():
        try:
            out[p] = ckpt_format.read_meta(ckpt_format.resolve(p).root)
        except Exception:  # safetensors inputs have no ptm metadata
            out[p] = None
    return out


def _nonfinite(v: Any) -> str | None:
    """Why the number `v` is not a usable weight (NaN/Inf, or Inf once cast to float32), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        return None  # not a number: schedule_values says what a weight may be
    try:
        if not math.isfinite(float(v)):
            return "is not finite"
    except OverflowError:  # a Python int beyond float64
        return "overflows float32, the merge's compute type"
    with np.errstate(over="ignore"):
        if not np.isfinite(np.float32(v)):
            return f"overflows float32, the merge's compute type (largest {float(np.finfo(np.float32).max):.4g})"
    return None


def check_weights(spec: Any, where: str) -> None:
    """Refuse NaN/Inf weights (and weights that are Inf in float32, such as 1e40) anywhere in a weight spec:
    a number, a list of them, or a layer schedule. Such a weight turns the whole output into NaN/Inf."""
    items: list[tuple[str, Any]] = []
    if isinstance(spec, list | tuple):
        for k, s in enumerate(spec):
            if isinstance(s, dict):
                items += [(f"[{k}].{key}", s.get(key)) for key in ("layers", "anchors", "default") if key in s]
            else:
                items.append((f"[{k}]", s))
    elif isinstance(spec, dict):
        items += [(f".{key}", spec.get(key)) for key in ("layers", "anchors", "default") if key in spec]
    else:
        items.append(("", spec))
    for path, v in items:
        for idx, x in enumerate(v) if isinstance(v, list | tuple) else [(None, v)]:
            why = _nonfinite(x)
            if why:
                at = f"{path}[{idx}]" if idx is not None else path
                raise MergeError(f"{where}: weight{' ' + at if at else ''} = {x!r} {why}; weights must be finite")


def schedule_values(spec: Any, n_layers: int, where: str) -> tuple[np.ndarray, float]:
    """A weight spec as (per-layer float64 values, value for non-layer tensors)."""
    check_weights(spec, where)
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return np.full(n_layers, float(spec)), float(spec)
    if isinstance(spec, dict):
        bad = set(spec) - {"layers", "anchors", "default"}
        if bad or ("layers" in spec) == ("anchors" in spec):
            raise MergeError(
                f"{where}: a layer schedule is {{layers = [...]}} or {{anchors = [...]}} "
                f"(optional default = x), got {spec!r}"
            )
        if "layers" in spec:
            vals = np.asarray(spec["layers"], dtype=np.float64)
            if vals.shape != (n_layers,):
                raise MergeError(
                    f"{where}: layer schedule has {vals.size} values but the model has {n_layers} layers"
                )
        else:
            anchors = np.asarray(spec["anchors"], dtype=np.float64)
            if anchors.ndim != 1 or anchors.size < 1:
                raise MergeError(f"{where}: anchors must be a non-empty list of numbers")
            if anchors.size == 1 or n_layers == 1:
                vals = np.full(n_layers, anchors[0])
            else:
                vals = np.interp(np.linspace(0, 1, n_layers), np.linspace(0, 1, anchors.size), anchors)
        default = float(spec.get("default", vals.mean() if vals.size else 0.0))
        return vals, default
    raise MergeError(f"{where}: bad weight {spec!r} (a number, a list, or a layer schedule)")


def match(pattern: str, name: str) -> bool:
    """Glob on the tensor name, or a regular expression (re.search) when the pattern starts with `re:`."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class WeightPlan:
    """Per weighted input, per-layer values and the non-layer value, for one tensor."""

    per_layer: list[np.ndarray]  # one array [n_layers] per weighted input
    default: list[float]


def resolve_weights(
    recipe: Recipe, method: methods.Method, name: str, n_layers: int, heuristic: list[float] | None
) -> WeightPlan:
    """The weights that apply to tensor `name`: the first matching override, else the recipe's weights."""
    spec = recipe.weights
    where = f"recipe {recipe.name or recipe.method}" + (f" (out {recipe.out})" if recipe.out else "")
    for o in recipe.overrides:
        if match(o["pattern"], name):
            spec, where = o["weights"], f"{where}: override {o['pattern']!r}"
            break
    n = method.n_weights(recipe.inputs)
    if spec == "heuristic":
        if heuristic is None:
            raise MergeError(f"{where}: omega='heuristic' is not available for method {method.name!r}")
        spec = heuristic
    specs = list(spec) if isinstance(spec, list | tuple) else [spec] * n
    if len(specs) != n:
        role = method.weighted if method.weighted != "omega" else "omega"
        raise MergeError(
            f"{where}: {len(specs)} weights given but method {method.name!r} needs {n} "
            f"(one per entry of {role})"
        )
    vals = [schedule_values(s, n_layers, where) for s in specs]
    return WeightPlan([v for v, _ in vals], [d for _, d in vals])
