"""From cached scores to the study's numbers: aggregates, selection on validation, costs, the paper's tables.

Scores are in percent (0-100). General = mean over the general tasks; a skill's score = mean over its tasks;
`benign` = mean compliance on the look-alike tasks (the exaggerated-refusal measure: higher = fewer
exaggerated refusals). Selection picks, per method, the candidate with the best validation score by
`selection` ("skill": skill score, ties broken by general; "mean": mean of general and skill).
"""

from __future__ import annotations

import math
import os
from itertools import combinations
from typing import Any

from ptm.experiment import costs as C
from ptm.experiment.plan import Study, wise_ft_run


def aggregate(exp: Study, rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """general / per-skill / benign means (percent) of one cached eval record."""
    if rec is None:
        return None
    t = rec["tasks"]

    def mean(names) -> float | None:
        vals = [t[n] for n in names if n in t]
        return 100.0 * sum(vals) / len(vals) if vals and len(vals) == len(list(names)) else None

    cfg = exp.cfg
    out: dict[str, Any] = {"general": mean(cfg.eval.general_tasks), "skills": {}, "benign": {}}
    for s in cfg.skills:
        out["skills"][s.name] = mean(s.tasks)
        if s.benign_tasks:
            out["benign"][s.name] = mean(s.benign_tasks)
    benign = [v for v in out["benign"].values() if v is not None]
    out["benign_mean"] = sum(benign) / len(benign) if benign else None
    out["tasks"] = {k: 100.0 * v for k, v in t.items()}
    return out


def _key(exp: Study, agg: dict[str, Any], skill: str) -> tuple[float, float]:
    g, s = agg["general"] or 0.0, agg["skills"][skill] or 0.0
    return ((g + s) / 2, s) if exp.cfg.selection == "mean" else (s, g)


def candidates(exp: Study, skill: str) -> dict[str, list[str]]:
    """Per method, the model ids selection chooses from (the heuristic point is reported on its own)."""
    out: dict[str, list[str]] = {"cft": [], "rt": []}
    for mid, m in exp.models.items():
        if m.skill != skill:
            continue
        if m.group in ("cft", "rt"):
            out[m.group].append(mid)
        elif m.group == "ptm" and not m.heuristic:
            out.setdefault(m.method, []).append(mid)
    return out


def select(exp: Study, skill: str) -> dict[str, str]:
    sel = {}
    for method, ids in candidates(exp, skill).items():
        scored = [(mid, aggregate(exp, exp.scores["validation"].get(mid))) for mid in ids]
        scored = [(mid, a) for mid, a in scored if a is not None]
        if scored:
            sel[method] = max(scored, key=lambda x: _key(exp, x[1], skill))[0]
    return sel


def heuristic_ids(exp: Study, skill: str) -> dict[str, str]:
    return {
        m.method: mid
        for mid, m in exp.models.items()
        if m.group == "ptm" and m.skill == skill and m.heuristic
    }


def reported_models(exp: Study) -> list[str]:
    """The models whose test scores go into the tables (selection runs on validation first)."""
    ids = ["general", "pre"]
    for s in exp.cfg.skills:
        ids.append(f"skill_only_{s.name}")
        ids += list(select(exp, s.name).values())
        ids += list(heuristic_ids(exp, s.name).values())
    ids += [mid for mid, m in exp.models.items() if m.group in ("multi", "pairwise", "cft_all", "rt_all")]
    return [i for i in dict.fromkeys(ids) if i in exp.models]


def model_cost(exp: Study, mid: str) -> C.Cost | None:
    """Training cost of the method that produced `mid`, paper accounting (see ptm.experiment.costs)."""
    m = exp.models[mid]
    if m.group in ("cft", "rt"):
        s = exp.cfg.skill(m.skill)
        return C.total(exp.run_costs, [f"{m.group}_{s.name}_{n}" for n in s.sizes])
    if m.group == "ptm":
        plan = C.method_runs(m.skill, (), _wise(exp, m.skill), [m.method])
        return C.total(exp.run_costs, plan[m.method])
    if m.group == "skill_only":
        return C.total(exp.run_costs, [f"skill_{m.skill}"])
    if m.group in ("multi", "pairwise"):
        return C.total(exp.run_costs, [f"skill_{k}" for k in m.skills])
    if m.group in ("cft_all", "rt_all"):
        return C.total(exp.run_costs, [m.group])
    return None


def _wise(exp: Study, skill: str) -> str:
    return wise_ft_run(exp.cfg, skill)


def pct_change(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base == 0:
        return None
    return 100.0 * (new - base) / base


def _cosines(exp: Study) -> dict[str, Any]:
    """Per-layer cosine similarity between the task vectors (theta_D - theta_pre) of every pair of skills."""
    from ptm.merge.inspect import diff

    out = {}
    names = [s.name for s in exp.cfg.skills]
    for a, b in combinations(names, 2):
        r = diff(exp.run_dir(f"skill_{a}"), exp.run_dir(f"skill_{b}"), exp.pre_path)
        out[f"{a}+{b}"] = {"layers": [r.layers[i] for i in sorted(r.layers)], "total": r.total_cos}
    return out


def analyze(exp: Study, cosines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (`cosines`: precomputed, else from the runs)."""
    cfg = exp.cfg
    models: dict[str, Any] = {}
    for mid, m in exp.models.items():
        cost = model_cost(exp, mid)
        models[mid] = {
            "group": m.group,
            "skill": m.skill,
            "skills": list(m.skills),
            "method": m.method,
            "omega": m.omega,
            "heuristic": m.heuristic,
            "size": m.size,
            "validation": aggregate(exp, exp.scores["validation"].get(mid)),
            "test": aggregate(exp, exp.scores["test"].get(mid)),
            "cost": cost.to_dict() if cost else None,
        }
    selection, table2, table3, curves = {}, {}, {}, {}
    for s in cfg.skills:
        sel = select(exp, s.name)
        heur = heuristic_ids(exp, s.name)
        selection[s.name] = {"best": sel, "heuristic": heur}

        def row(label: str, mid: str | None, s=s) -> dict[str, Any]:
            t = models[mid]["test"] if mid else None
            c = models[mid]["cost"] if mid else None
            return {
                "label": label,
                "model": mid,
                "general": t["general"] if t else None,
                "skill": t["skills"][s.name] if t else None,
                "benign": t["benign"].get(s.name) if t else None,
                "steps": c["steps"] if c else 0,
                "examples": c["examples"] if c else 0,
                "omega": models[mid]["omega"] if mid else None,
            }

        rows = [
            row("Instruction-tuned (theta_G)", "general"),
            row("Best CFT", sel.get("cft")),
            row("Best RT", sel.get("rt")),
            row("Best PTM (task arithmetic)", sel.get("task_arithmetic")),
        ]
        if "task_arithmetic" in heur:
            rows.append(row("PTM heuristic omega (D/G)", heur["task_arithmetic"]))
        for method in ("linear_interpolation", "wise_ft"):
            if method in sel:
                rows.append(row(f"Best {method}", sel[method]))
        table2[s.name] = rows
        b = rows[0]
        compared = [
            r
            for r in rows[1:]
            if r["label"]
            in ("Best CFT", "Best RT", "Best PTM (task arithmetic)", "PTM heuristic omega (D/G)")
        ]
        table3[s.name] = [
            {
                "label": r["label"],
                "model": r["model"],
                **{f"{k}_pct": pct_change(r[k], b[k]) for k in ("general", "skill", "benign")},
                **{f"{k}_delta": _delta(r[k], b[k]) for k in ("general", "skill", "benign")},
            }
            for r in compared
        ]
        curves[s.name] = _curves(exp, models, s.name)
    table4 = []
    for mid in ["general"] + [m for m in models if models[m]["group"] in ("cft_all", "rt_all", "multi")]:
        t = models[mid]["test"]
        c = models[mid]["cost"]
        label = {
            "general": "Instruction-tuned (theta_G)",
            "cft_all": "CFT (all skills)",
            "rt_all": "RT (all skills)",
        }.get(mid, f"PTM all skills ({models[mid]['method']}, heuristic)")
        table4.append(
            {
                "label": label,
                "model": mid,
                "general": t["general"] if t else None,
                "skills": dict(t["skills"]) if t else {},
                "benign": t["benign_mean"] if t else None,
                "steps": c["steps"] if c else 0,
                "examples": c["examples"] if c else 0,
            }
        )
    cos = cosines if cosines is not None else (_cosines(exp) if len(cfg.skills) > 1 else {})
    table5 = []
    for mid in [m for m in models if models[m]["group"] == "pairwise"]:
        t = models[mid]["test"]
        pair = "+".join(models[mid]["skills"])
        table5.append(
            {
                "label": " + ".join(models[mid]["skills"]),
                "model": mid,
                "general": t["general"] if t else None,
                "skills": dict(t["skills"]) if t else {},
                "benign": t["benign_mean"] if t else None,
                "cosine": cos.get(pair, {}).get("total"),
                "cosine_layers": cos.get(pair, {}).get("layers"),
            }
        )
    runs = {rid: vars(rc) for rid, rc in exp.run_costs.items()}
    formulas = {}
    g = exp.run_costs.get("general")
    for s in cfg.skills:
        d = exp.run_costs[f"skill_{s.name}"].examples
        formulas[s.name] = {
            "cft": C.cft_examples(s.sizes),
            "rt": C.rt_examples(g.examples, s.sizes) if g else None,
            "ptm": C.ptm_examples(d),
            "rt_trials": C.rt_trials(s.sizes),  # the paper's n: one retraining per D_i
            "d_sizes": list(s.sizes),
        }
    return {
        "name": cfg.name,
        "config": os.path.abspath(cfg.source),
        "selection_rule": cfg.selection,
        "eval_items_per_task": cfg.eval.max_items_per_task,
        "heuristic_omegas": dict(exp.heuristics),
        "runs": runs,
        "formula_examples": formulas,
        "models": models,
        "selection": selection,
        "curves": curves,
        "cosine": cos,
        "tables": {"table2": table2, "table3": table3, "table4": table4, "table5": table5},
    }


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _curves(exp: Study, models: dict[str, Any], skill: str) -> dict[str, list[dict[str, Any]]]:
    """Validation (general, skill) points per method, for Figures 1 and 3."""
    out: dict[str, list[dict[str, Any]]] = {}
    for mid, m in models.items():
        if m["skill"] != skill or m["validation"] is None:
            continue
        v = m["validation"]
        pt = {
            "model": mid,
            "general": v["general"],
            "skill": v["skills"][skill],
            "benign": v["benign"].get(skill),
        }
        if m["group"] in ("cft", "rt"):
            out.setdefault(m["group"], []).append({**pt, "size": m["size"]})
        elif m["group"] == "ptm":
            key = m["method"] + ("_heuristic" if m["heuristic"] else "")
            out.setdefault(key, []).append({**pt, "omega": m["omega"]})
    for k in out:
        out[k].sort(key=lambda p: p.get("size") or p.get("omega") or 0)
    g = models["general"]["validation"]
    if g:
        out["general"] = [
            {
                "model": "general",
                "general": g["general"],
                "skill": g["skills"][skill],
                "benign": g["benign"].get(skill),
            }
        ]
    return out


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
