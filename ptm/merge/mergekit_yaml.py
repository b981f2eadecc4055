"""Run mergekit YAML configs as they are: translate a mergekit config into ptm Recipes (convention "mergekit").

Supported: `merge_method`, `base_model`, `models` (each `model` with `parameters`: weight, density, epsilon, gamma;
a number, a layer gradient `[a, ..., b]` — non-layer tensors take the first anchor, as in mergekit —, or a list
of `{filter: substring, value: ...}` conditions with an unfiltered default), top-level `parameters` (t, lambda,
normalize, rescale, select_topk, nuslerp_flatten, normalize_weights, eps, max_iter, tol, int8_mask), `dtype`,
`out_dtype`, `tokenizer_source` or `tokenizer: {source, tokens, pad_to_multiple_of}` (vocabulary surgery,
ptm.merge.vocab), `chat_template` (a Jinja string), `slices` (frankenmerges: passthrough, or any method over
aligned slices — one source per model, equal range lengths) with per-slice weights (source- and slice-level
parameters, gradients within a slice: per-layer schedules). Anything else (per-slice density/epsilon/gamma that
differ, `filter` with slices, embed_slerp, named chat templates, unknown parameters) is a ConfigError naming it.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np

from ptm.errors import ConfigError
from ptm.merge import slices as SL
from ptm.merge.recipe import Recipe

# mergekit method -> (ptm method, input layout)
METHODS = {
    "linear": ("linear", "models"),
    "task_arithmetic": ("task_arithmetic", "tv"),
    "ties": ("ties", "tv"),
    "dare_linear": ("dare", "tv"),
    "dare_ties": ("dare_ties", "tv"),
    "breadcrumbs": ("breadcrumbs", "tv"),
    "breadcrumbs_ties": ("breadcrumbs_ties", "tv"),
    "della": ("della", "tv"),
    "della_linear": ("della_linear", "tv"),
    "sce": ("sce", "tv"),
    "model_stock": ("model_stock", "tv"),
    "slerp": ("slerp", "pair"),
    "nearswap": ("nearswap", "pair"),
    "nuslerp": ("nuslerp", "models+base"),
    "multislerp": ("multislerp", "models+base"),
    "karcher": ("karcher", "all"),
    "passthrough": ("passthrough", "models"),
}
TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
       "chat_template", "name"}
GLOBAL = {"t": None, "lambda": "lambda_", "normalize": "normalize", "rescale": "rescale", "select_topk": "select_topk",
          "nuslerp_flatten": "flatten", "normalize_weights": "normalize_weights", "eps": "eps",
          "max_iter": "max_iter", "tol": "tol", "int8_mask": None}
PER_MODEL = {"weight", "density", "epsilon", "gamma", "scale"}


def _model(m: Any, where: str) -> str:
    if isinstance(m, str):
        return m
    if isinstance(m, dict) and "model" in m:
        return _model(m["model"], where)
    raise ConfigError(f"{where}: a model is a path (got {m!r})")


def _value(v: Any, where: str) -> Any:
    """A mergekit parameter value as a ptm weight spec: number, gradient -> {anchors, default = first}."""
    if isinstance(v, bool):  # normalize, rescale, nuslerp_flatten, ...
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, list) and v and all(isinstance(a, int | float) and not isinstance(a, bool) for a in v):
        return {"anchors": [float(a) for a in v], "default": float(v[0])}
    raise ConfigError(f"{where}: expected a number or a gradient list of numbers, got {v!r}")


def _conditions(v: Any, where: str) -> list[tuple[str | None, Any]]:
    """[(filter or None, spec)]: mergekit's conditional parameter list, first match wins, None = default."""
    if isinstance(v, list) and v and all(isinstance(c, dict) for c in v):
        out = []
        for i, c in enumerate(v):
            bad = set(c) - {"filter", "value"}
            if bad or "value" not in c:
                raise ConfigError(f"{where}[{i}]: a condition is {{filter: ..., value: ...}} (got keys {sorted(c)})")
            out.append((c.get("filter"), _value(c["value"], f"{where}[{i}].value")))
        return out
    return [(None, _value(v, where))]


def _pick(conds: list[tuple[str | None, Any]], name: str, default: Any) -> Any:
    for f, spec in conds:
        if f is None or f in name:
            return spec
    return default


def _scalar(spec: Any, where: str) -> float:
    if isinstance(spec, dict):
        raise ConfigError(f"{where}: a layer gradient is not supported for this parameter in ptm")
    return spec


def translate(cfg: dict[str, Any], out: str | None = None, tensor_names: list[str] | None = None,
              where: str = "mergekit config") -> list[Recipe]:
    """The ptm Recipe of a mergekit config. `tensor_names` (of the inputs) are needed only when `filter`
    conditions are used: ptm resolves them into per-tensor overrides (exact names)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: not a mapping")
    for k in cfg:
        if k not in TOP and k != "slices":
            raise ConfigError(f"{where}: unsupported key {k!r} (supported: {sorted(TOP | {'slices'})})")
    mm = cfg.get("merge_method")
    if mm not in METHODS:
        raise ConfigError(f"{where}: merge_method {mm!r} is not supported (supported: {sorted(METHODS)})")
    method, layout = METHODS[mm]
    base = _model(cfg["base_model"], f"{where}: base_model") if cfg.get("base_model") else None
    sl = _slices(cfg, where) if "slices" in cfg else None
    entries = [_slice_entry(e, cfg["slices"][0], base, where) for e in sl[0]] if sl else (cfg.get("models") or [])
    models, params = [], []
    for i, e in enumerate(entries):
        p = _model(e, f"{where}: models[{i}]")
        ps = (e.get("parameters") or {}) if isinstance(e, dict) else {}
        bad = set(e) - {"model", "parameters"} if isinstance(e, dict) else set()
        if bad:
            raise ConfigError(f"{where}: models[{i}]: unsupported key(s) {sorted(bad)}")
        for k in ps:
            if k not in PER_MODEL:
                raise ConfigError(f"{where}: models[{i}].parameters: unsupported parameter {k!r}")
        if p == base and layout == "tv" and "weight" in ps:
            warnings.warn(f"{where}: models[{i}]: the weight on base_model {p!r} has no effect (as in mergekit "
                          "0.1.5, measured); for a weighted base-side model use a ptm recipe's general_weight",
                          stacklevel=2)
        models.append(p)
        params.append({k: _conditions(v, f"{where}: models[{i}].parameters.{k}") for k, v in ps.items()})
    gp = cfg.get("parameters") or {}
    for k in gp:
        if k not in GLOBAL and k not in PER_MODEL:
            raise ConfigError(f"{where}: parameters: unsupported parameter {k!r}")
    gconds = {k: _conditions(v, f"{where}: parameters.{k}") for k, v in gp.items() if k != "int8_mask"}

    # inputs and which entries carry weights
    if layout in ("tv",):
        if base is None:
            raise ConfigError(f"{where}: merge_method {mm} needs base_model")
        keep = [i for i, m in enumerate(models) if m != base]
        inputs: dict[str, Any] = {"pre": base, "skills": [models[i] for i in keep]}
    elif layout == "pair":
        if base is None:
            raise ConfigError(f"{where}: merge_method {mm} needs base_model")
        others = [m for m in models if m != base]
        if len(others) != 1:
            raise ConfigError(f"{where}: merge_method {mm} takes the base_model and exactly one other model")
        keep = []
        inputs = {"models": [base, others[0]]}
    elif layout == "all":  # mergekit 0.1.5's karcher: every entry, the base too, weighted equally (measured)
        keep = list(range(len(models)))
        if any("weight" in ps for ps in params):
            warnings.warn(f"{where}: the models' weights have no effect on {mm} (mergekit 0.1.5 weights every "
                          "model, base_model included, equally); for a weighted Karcher mean use a ptm recipe",
                          stacklevel=2)
        inputs = {"models": models if base is None or base in models else [base, *models]}
    else:
        keep = [i for i, m in enumerate(models) if m != base] if layout == "models+base" and base else list(
            range(len(models)))
        inputs = {"models": [models[i] for i in keep]}
        if layout == "models+base" and base:
            inputs["pre"] = base
    if mm == "linear" and base and base not in models:
        raise ConfigError(f"{where}: linear takes no base_model unless it is one of the models")

    def param(k: str, i: int | None, name: str | None, default: Any) -> Any:
        conds = params[i].get(k) if i is not None else None
        if conds is None:
            conds = gconds.get(k)
        if conds is None:
            return default
        return _pick(conds, name or "", default) if name is not None else next(
            (s for f, s in conds if f is None), default)

    has_filters = any(f is not None for c in [*gconds.values(), *(v for p in params for v in p.values())]
                      for f, _ in c)
    weight_key = "t" if layout == "pair" else ("scale" if mm == "passthrough" else "weight")

    def weights_for(name: str | None) -> Any:
        if layout == "pair" or mm == "passthrough":
            return param(weight_key, keep[0] if mm == "passthrough" and keep else None, name, 1.0 if
                         mm == "passthrough" else 0.5)
        if method in ("model_stock", "sce"):
            return 1.0
        if layout == "all":
            return [1.0] * len(inputs["models"])
        return [param("weight", i, name, 1.0) for i in keep]

    r = Recipe(method, inputs, weights=weights_for(None), out=out, convention="mergekit", name=str(cfg.get("name", "")))
    if method in ("model_stock", "sce"):
        r.weights = 1.0
    opts: dict[str, Any] = {}
    for k, v in gconds.items():
        if k in PER_MODEL or GLOBAL.get(k) is None:
            continue
        opts[GLOBAL[k]] = _scalar(next((s for f, s in v if f is None), None), f"{where}: parameters.{k}")
    for k in ("density", "epsilon", "gamma"):
        vals = [param(k, i, None, None) for i in keep]
        if any(v is not None for v in vals):
            if any(v is None for v in vals):
                raise ConfigError(f"{where}: {k} must be given for every model (or globally)")
            vals = [_scalar(v, f"{where}: {k}") for v in vals]
            if k == "density" and method in ("dare", "dare_ties"):
                r.drop_rate = [1.0 - v for v in vals] if len(set(vals)) > 1 else 1.0 - vals[0]
            elif k == "density" and method == "ties":
                r.density = vals if len(set(vals)) > 1 else vals[0]
            else:
                opts[k] = vals if len(set(vals)) > 1 else vals[0]
    if "normalize" in opts:
        r.normalize = opts.pop("normalize")
    if method in ("dare", "dare_ties") and opts.pop("rescale", True) is False:
        raise ConfigError(f"{where}: rescale: false is not supported for DARE in ptm")
    if method == "dare":
        opts.pop("lambda_", None) if opts.get("lambda_", 1.0) == 1.0 else None
    r.method_options = opts
    if has_filters:
        if sl is not None:
            raise ConfigError(f"{where}: `filter` conditions together with `slices` are not supported by ptm yet")
        if tensor_names is None:
            raise ConfigError(f"{where}: `filter` conditions need the inputs' tensor names")
        groups: dict[str, list[str]] = {}
        for n in tensor_names:
            groups.setdefault(repr(weights_for(n)), []).append(n)
        default = repr(weights_for(None))
        r.overrides = [{"pattern": "re:^(" + "|".join(re.escape(n) for n in ns) + ")$",
                        "weights": weights_for(ns[0])} for key, ns in groups.items() if key != default]
    if sl is not None:
        r.slices = _recipe_slices(sl, r.input_paths(), base, where)
        if method not in ("model_stock", "sce"):
            _slice_weights(r, cfg["slices"], sl, base, layout, weight_key, gconds, where)
    dt, odt = cfg.get("dtype"), cfg.get("out_dtype")
    for k, v in (("dtype", dt), ("out_dtype", odt)):
        if v is not None and v not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}: {k} {v!r} is not supported (float32, bfloat16, float16)")
    # ptm computes in float32 always; mergekit writes `dtype` unless out_dtype is given.
    r.output_dtype = odt or dt
    _tokenizer(cfg, r, where)
    ct = cfg.get("chat_template")
    if ct is not None:
        if not isinstance(ct, str) or "{" not in ct:
            raise ConfigError(f"{where}: chat_template {ct!r}: only a literal Jinja template is supported")
        r.chat_template = ct
    return [r]


def _tokenizer(cfg: dict[str, Any], r: Recipe, where: str) -> None:
    """`tokenizer_source` (legacy) or the `tokenizer:` block (source, default union; tokens; pad_to_multiple_of)
    -> r.tokenizer (a source string, or the block for ptm.merge.vocab); outputs that need a new tokenizer
    (union, listed tokens) are safetensors."""
    from ptm.merge import vocab

    legacy, block = cfg.get("tokenizer_source"), cfg.get("tokenizer")
    if legacy is not None and block is not None:
        raise ConfigError(f"{where}: give tokenizer or tokenizer_source, not both (as in mergekit)")
    if legacy is None and block is None:
        return
    if block is not None and not isinstance(block, dict):
        raise ConfigError(f"{where}: tokenizer must be a mapping {{source, tokens, pad_to_multiple_of}}")
    spec = {"source": legacy} if legacy is not None else {"source": "union", **block}
    if not isinstance(spec["source"], str):
        raise ConfigError(f"{where}: tokenizer source {spec['source']!r} is not supported (base, union or a model "
                          "path)")
    sp = vocab.parse_spec(spec, r.input_paths(), f"{where}: tokenizer")
    if not sp.tokens and sp.pad_to_multiple_of is None:
        r.tokenizer = sp.source
    else:
        r.tokenizer = {"source": sp.source, **({"tokens": block["tokens"]} if sp.tokens else {}),
                       **({"pad_to_multiple_of": sp.pad_to_multiple_of} if sp.pad_to_multiple_of else {})}
    if sp.source == "union" or sp.tokens:
        r.output_format = r.output_format or "safetensors"


def _slices(cfg: dict[str, Any], where: str) -> list[list[dict[str, Any]]]:
    """mergekit `slices`: per slice, its sources (model, layer_range, parameters)."""
    if "models" in cfg:
        raise ConfigError(f"{where}: give `models` or `slices`, not both")
    sl = cfg["slices"]
    if not isinstance(sl, list) or not sl:
        raise ConfigError(f"{where}: slices must be a non-empty list")
    out = []
    for i, s in enumerate(sl):
        if not isinstance(s, dict) or "sources" not in s or set(s) - {"sources", "parameters"} or not isinstance(
                s["sources"], list) or not s["sources"]:
            raise ConfigError(f"{where}: slices[{i}] must be {{sources: [...], parameters: {{...}}}} (got {s!r})")
        if not isinstance(s.get("parameters") or {}, dict):
            raise ConfigError(f"{where}: slices[{i}].parameters must be a mapping")
        for k, src in enumerate(s["sources"]):
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src or (
                    set(src) - {"model", "layer_range", "parameters"}):
                raise ConfigError(f"{where}: slices[{i}].sources[{k}] needs model and layer_range (and optional "
                                  f"parameters), got {src!r}")
        if i and len(s["sources"]) != len(sl[0]["sources"]):
            raise ConfigError(f"{where}: slices[{i}] has {len(s['sources'])} sources, slices[0] has "
                              f"{len(sl[0]['sources'])}: ptm merges aligned slices (one source per model)")
        out.append(s["sources"])
    return out


def _slice_rows(sl: list[list[dict[str, Any]]], inputs: list[str], base: str | None, where: str
                ) -> list[list[dict[str, Any]]]:
    """Per slice, the mergekit source dict of each recipe input (the base_model's source at the base's position,
    the other sources in order at the other positions)."""
    out = []
    for i, srcs in enumerate(sl):
        rest = [s for s in srcs if base is None or _model(s["model"], where) != base]
        at_base = [s for s in srcs if base is not None and _model(s["model"], where) == base]
        row = []
        for p in inputs:
            if base is not None and p == base:
                if not at_base:
                    raise ConfigError(f"{where}: slices[{i}] has no source from base_model {base!r}")
                row.append(at_base[0])
            else:
                if not rest:
                    raise ConfigError(f"{where}: slices[{i}] has fewer sources than slices[0]")
                row.append(rest.pop(0))
        out.append(row)
    return out


def _recipe_slices(sl: list[list[dict[str, Any]]], inputs: list[str], base: str | None, where: str
                   ) -> list[dict[str, Any]]:
    """ptm recipe slices: per slice one source per recipe input (see _slice_rows)."""
    return [{"sources": [{"model": _model(s["model"], where), "layer_range": [int(v) for v in s["layer_range"]]}
                         for s in row]} for row in _slice_rows(sl, inputs, base, where)]


def _slice_entry(src: dict[str, Any], sl_cfg: dict[str, Any], base: str | None, where: str) -> dict[str, Any]:
    """slices[0]'s source as a `models` entry: its parameters over the slice's own (mergekit's precedence: source,
    then slice, then global); a slice-level weight is not given to the base model, which it does not weigh."""
    slice_ps = {k: v for k, v in (sl_cfg.get("parameters") or {}).items() if k in PER_MODEL}
    if base is not None and _model(src["model"], where) == base:
        slice_ps.pop("weight", None)
    ps = {**slice_ps, **(src.get("parameters") or {})}
    return {"model": src["model"], **({"parameters": ps} if ps else {})}


def _per_layer(spec: Any, n: int) -> list[float]:
    """A weight spec (number or {anchors}) over a slice's n layers: mergekit interpolates a gradient within each
    slice (measured: [0, 1] over 3 layers gives 0, 0.5, 1)."""
    if not isinstance(spec, dict):
        return [float(spec)] * n
    a = np.asarray(spec["anchors"], np.float64)
    if a.size == 1 or n == 1:
        return [float(a[0])] * n
    return [float(v) for v in np.interp(np.linspace(0, 1, n), np.linspace(0, 1, a.size), a)]


def _slice_weights(r: Recipe, raw: list[dict[str, Any]], sl: list[list[dict[str, Any]]], base: str | None,
                   layout: str, weight_key: str, gconds: dict[str, Any], where: str) -> None:
    """Per-slice parameters (`slices[i].parameters`, `slices[i].sources[j].parameters`): the weights become
    per-layer schedules over the output's layers, each slice's layers taking that slice's value (a gradient
    interpolated within the slice); the embedding takes the first slice's value and every other non-layer tensor
    the last slice's (mergekit, measured). Other parameters (density, ...) must be the same in every slice."""
    inputs = r.input_paths()
    rows = _slice_rows(sl, inputs, base, where)
    weighted = [p for p, path in enumerate(inputs) if layout == "models" or path != base] if layout != "pair" else []

    def resolve(i: int, p: int | None, k: str) -> Any:
        src_ps = (rows[i][p].get("parameters") or {}) if p is not None else {}
        slice_ps = raw[i].get("parameters") or {}
        at = f"{where}: slices[{i}]" + (f" ({_model(rows[i][p]['model'], where)})" if p is not None else "")
        if k in src_ps:
            return _value(src_ps[k], f"{at}.parameters.{k}")
        if k in slice_ps and not (k == "weight" and p is not None and inputs[p] == base and layout != "models"):
            return _value(slice_ps[k], f"{at}.parameters.{k}")
        c = gconds.get(k)
        return next((v for f, v in c if f is None), None) if c else None

    for i, row in enumerate(rows):
        for k, v in (raw[i].get("parameters") or {}).items():
            if k not in PER_MODEL and k != weight_key:
                raise ConfigError(f"{where}: slices[{i}].parameters: unsupported parameter {k!r}")
            if isinstance(v, list) and v and isinstance(v[0], dict):
                raise ConfigError(f"{where}: slices[{i}].parameters.{k}: `filter` conditions together with "
                                  "`slices` are not supported by ptm yet")
        for p, src in enumerate(row):
            for k, v in (src.get("parameters") or {}).items():
                if k not in PER_MODEL:
                    raise ConfigError(f"{where}: slices[{i}].sources: unsupported parameter {k!r}")
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    raise ConfigError(f"{where}: slices[{i}].sources parameter {k}: `filter` conditions together "
                                      "with `slices` are not supported by ptm yet")
            for k in PER_MODEL - {"weight", weight_key}:
                if i and resolve(i, p, k) != resolve(0, p, k):
                    raise ConfigError(f"{where}: slices[{i}]: parameter {k!r} of {_model(src['model'], where)} "
                                      "differs from slices[0]'s; ptm takes per-slice weights only (give it once)")
    default = 1.0 if weight_key != "t" else 0.5
    positions: list[int | None] = list(weighted) if layout != "pair" else [None]
    specs = [[s if (s := resolve(i, p, weight_key)) is not None else default for p in positions]
             for i in range(len(rows))]
    scalar = layout == "pair" or weight_key == "scale"
    if all(sp == specs[0] for sp in specs) and (len(rows) == 1 or not any(isinstance(v, dict) for v in specs[0])):
        r.weights = specs[0][0] if scalar else specs[0]  # the same in every slice: model-level weights
        return
    lens = [rows[i][0]["layer_range"][1] - rows[i][0]["layer_range"][0] for i in range(len(rows))]

    def first(v: Any) -> float:
        return float(v["anchors"][0]) if isinstance(v, dict) else float(v)

    sched = [{"layers": [x for i, n in enumerate(lens) for x in _per_layer(specs[i][q], n)],
              "default": first(specs[-1][q])} for q in range(len(positions))]
    emb = [first(specs[0][q]) for q in range(len(positions))]
    r.weights = sched[0] if scalar else sched
    r.overrides = [{"pattern": SL.EMBED_PATTERN, "weights": emb[0] if scalar else emb}]


def load(path: str, out: str | None = None) -> list[Recipe]:
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    names = None
    text = str(cfg)
    if "filter" in text:
        from ptm.ckpt import stores

        if "slices" in cfg:
            return translate(cfg, out=out, where=path)  # refuses filters with slices, naming them
        m = cfg.get("base_model") or _model((cfg.get("models") or [None])[0], path)
        names = list(stores.open_store(_model(m, path)).tensors())
    return translate(cfg, out=out, tensor_names=names, where=path)
