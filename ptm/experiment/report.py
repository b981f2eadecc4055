"""The study's report: Markdown tables shaped like the paper's Tables 2-5, JSON and CSV of every number, and
PNG plots like Figures 1 and 3 (matplotlib, Agg backend). Everything is derived from the analysis dict, so the
files always agree with `results.json`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ptm.experiment import files

FIG1 = "figure1_tradeoff.png"
FIG3 = "figure3_merge_methods.png"
FIG_COS = "cosine_layers.png"
METHOD_STYLE = {
    "task_arithmetic": ("PTM task arithmetic", "tab:green", "o-"),
    "linear_interpolation": ("linear interpolation", "tab:purple", "s-"),
    "wise_ft": ("WiSE-FT", "tab:brown", "^-"),
    "cft": ("CFT (D_i sizes)", "tab:red", "v--"),
    "rt": ("RT (D_i sizes)", "tab:blue", "D--"),
}


def fmt(x: Any, digits: int = 1) -> str:
    """Numbers as the tables show them (the CSV/JSON keep full precision)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(res: dict[str, Any]) -> str:
    t = res["tables"]
    skills = list(t["table2"])
    parts = [
        f"# Experiment `{res['name']}`",
        "",
        f"Config: `{res['config']}`. Scores in percent on the **test** split; selection (`best`) on the "
        f"validation split by `{res['selection_rule']}`. Steps and examples are training cost as the paper "
        "counts it (CFT: sum of all D_i runs; RT: n|G| + sum D_i; PTM: |D|).",
        "",
    ]
    parts += [
        "Heuristic omega = |D|/|G|: " + ", ".join(f"{k} {v:.4f}" for k, v in res["heuristic_omegas"].items()),
        "",
    ]
    parts += ["## Headline (what `ptm experiment` prints)", "", "```text", headline(res), "```", ""]
    parts += ["## Table 2: general vs skill, and cost", ""]
    for s in skills:
        rows = [
            [
                r["label"],
                fmt(r["general"]),
                fmt(r["skill"]),
                fmt(r["benign"]) if r["benign"] is not None else "",
                fmt(r["steps"]),
                fmt(r["examples"]),
                fmt(r["omega"], 3) if r["omega"] is not None else "",
            ]
            for r in t["table2"][s]
        ]
        parts += [
            f"### {s}",
            "",
            _md(["Model", "General", s.capitalize(), "Benign comply", "Steps", "Examples", "omega"], rows),
            "",
        ]
    parts += [
        "## Table 3: change vs the instruction-tuned model (% relative; absolute points in brackets)",
        "",
    ]
    rows = []
    for s in skills:
        for r in t["table3"][s]:
            rows.append(
                [
                    s,
                    r["label"],
                    f"{_signed(r['general_pct'])} ({_signed(r['general_delta'])})",
                    f"{_signed(r['skill_pct'])} ({_signed(r['skill_delta'])})",
                    f"{_signed(r['benign_pct'])} ({_signed(r['benign_delta'])})"
                    if r["benign_delta"] is not None
                    else "",
                ]
            )
    parts += [
        _md(["Skill", "Model", "General %", "Skill %", "Exaggerated refusals (benign comply) %"], rows),
        "",
    ]
    if t["table4"]:
        names = list(res["heuristic_omegas"])
        rows = [
            [
                r["label"],
                fmt(r["general"]),
                *[fmt(r["skills"].get(n)) for n in names],
                fmt(r["benign"]),
                fmt(r["steps"]),
                fmt(r["examples"]),
            ]
            for r in t["table4"]
        ]
        parts += [
            "## Table 4: all skills at once",
            "",
            _md(
                ["Model", "General", *names, "Exaggerated refusals (benign comply)", "Steps", "Examples"],
                rows,
            ),
            "",
        ]
    if t["table5"]:
        names = list(res["heuristic_omegas"])
        rows = [
            [
                r["label"],
                fmt(r["general"]),
                *[fmt(r["skills"].get(n)) for n in names],
                fmt(r["benign"]),
                fmt(r["cosine"], 4),
            ]
            for r in t["table5"]
        ]
        parts += [
            "## Table 5: pairwise merges (heuristic omegas) and task-vector cosine similarity",
            "",
            _md(["Skills merged", "General", *names, "Benign comply", "cos(tau_a, tau_b)"], rows),
            "",
        ]
    if res.get("cosine"):
        n_layers = max(len(v["layers"]) for v in res["cosine"].values())
        rows = [
            [pair, *[fmt(c, 4) for c in v["layers"]], fmt(v["total"], 4)] for pair, v in res["cosine"].items()
        ]
        parts += [
            "### Per-layer cosine similarity of task vectors (theta_D - theta_pre)",
            "",
            _md(["Pair", *[f"layer {i}" for i in range(n_layers)], "all"], rows),
            "",
        ]
    parts += ["## Training runs", ""]
    rows = [
        [rid, fmt(r["examples"]), fmt(r["examples_seen"]), fmt(r["steps"])] for rid, r in res["runs"].items()
    ]
    parts += [_md(["Run", "Examples", "Example visits", "Steps"], rows), ""]
    parts += [
        "Paper formulas (examples): "
        + "; ".join(
            f"{s}: CFT {fmt(f['cft'])}, RT {fmt(f['rt'])}, PTM {fmt(f['ptm'])}"
            for s, f in res["formula_examples"].items()
        ),
        "",
    ]
    parts += ["## Figures", "", f"![Figure 1]({FIG1})", "", f"![Figure 3]({FIG3})", ""]
    if res.get("cosine"):
        parts += [f"![cosine]({FIG_COS})", ""]
    return "\n".join(parts)


HEADLINE_ROWS = (
    ("Instruction-tuned (theta_G)", "theta_G"),
    ("Best CFT", "best CFT"),
    ("Best RT", "best RT"),
    ("Best PTM (task arithmetic)", "PTM, selected omega"),
    ("PTM heuristic omega (D/G)", "PTM, omega = |D|/|G|"),
)


def _ratio(a: int | None, b: int | None) -> str:
    return "n/a" if not a or not b else f"{a:,} / {b:,} = {100.0 * a / b:.0f} %"


def headline(res: dict[str, Any]) -> str:
    """The first screen of `ptm experiment`: per skill, general and skill score (test) and training steps of
    theta_G, the best CFT, the best RT, PTM (task arithmetic) at the omega selected on validation and at the
    heuristic omega = |D|/|G|, then PTM's cost as a share of RT's. Built from the analysis dict alone."""
    t2 = res["tables"]["table2"]
    models = res.get("models", {})
    items = res.get("eval_items_per_task")
    rule = {
        "skill": "highest validation skill score, ties by general",
        "mean": "highest validation mean of general and skill",
    }.get(res["selection_rule"], res["selection_rule"])
    noise = f"{items} items per task: one answer = {100.0 / items:.1f} points" if items else "all eval items"
    out = [f"Headline (test split; best = {rule}; {noise})"]
    for s, rows in t2.items():
        by = {r["label"]: r for r in rows}
        f = res.get("formula_examples", {}).get(s, {})
        om = res["heuristic_omegas"].get(s)
        sizes = f.get("d_sizes")
        n = f.get("rt_trials", len(sizes) if sizes is not None else None)
        head = f"{s}: heuristic omega |D|/|G| = {fmt(om, 3)}"
        if sizes is not None:
            head += f"; {len(sizes)} D_i size(s) {', '.join(f'{x:,}' for x in sizes)}; RT n = {n} trial(s)"
        out.append(head)
        benign = any(r["benign"] is not None for r in rows)
        cols = f"  {'model':<26} {'general':>7} {'skill':>6}" + (f" {'benign':>6}" if benign else "") + \
            f" {'steps':>6}  {'examples':>8}  detail"
        out.append(cols)
        for label, name in HEADLINE_ROWS:
            r = by.get(label)
            if r is None:
                continue
            m = models.get(r["model"] or "", {})
            detail = ""
            if r["omega"] is not None:
                detail = f"omega {r['omega']:.3g}"
            elif m.get("size") is not None:
                detail = f"D_i {m['size']:,}"
            line = f"  {name:<26} {fmt(r['general']):>7} {fmt(r['skill']):>6}"
            if benign:
                line += f" {fmt(r['benign']) if r['benign'] is not None else '':>6}"
            line += f" {fmt(r['steps']):>6}  {fmt(r['examples']):>8}  {detail}"
            out.append(line.rstrip())
        ptm, rt = by.get("Best PTM (task arithmetic)"), by.get("Best RT")
        if ptm and rt:
            out.append(
                f"  PTM / RT cost: steps {_ratio(ptm['steps'], rt['steps'])}; "
                f"examples {_ratio(ptm['examples'], rt['examples'])}"
            )
    return "\n".join(out)


CSV_FIELDS = [
    "model",
    "split",
    "group",
    "skill",
    "skills",
    "method",
    "omega",
    "heuristic",
    "size",
    "general",
    "benign_mean",
    "steps",
    "examples",
]


def csv_text(res: dict[str, Any]) -> str:
    """One row per (model, split) with every aggregate and task score."""
    skills = list(res["heuristic_omegas"])
    tasks = sorted(
        {k for m in res["models"].values() for sp in ("validation", "test") if m[sp] for k in m[sp]["tasks"]}
    )
    fields = (
        CSV_FIELDS
        + [f"skill:{s}" for s in skills]
        + [f"benign:{s}" for s in skills]
        + [f"task:{t}" for t in tasks]
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for mid, m in res["models"].items():
        for sp in ("validation", "test"):
            a = m[sp]
            if a is None:
                continue
            om = m["omega"]
            row = {
                "model": mid,
                "split": sp,
                "group": m["group"],
                "skill": m["skill"] or "",
                "skills": "+".join(m["skills"]),
                "method": m["method"] or "",
                "omega": ";".join(repr(x) for x in om)
                if isinstance(om, list)
                else ("" if om is None else repr(om)),
                "heuristic": m["heuristic"],
                "size": "" if m["size"] is None else m["size"],
                "general": _r(a["general"]),
                "benign_mean": _r(a["benign_mean"]),
                "steps": m["cost"]["steps"] if m["cost"] else "",
                "examples": m["cost"]["examples"] if m["cost"] else "",
            }
            row.update({f"skill:{s}": _r(a["skills"].get(s)) for s in skills})
            row.update({f"benign:{s}": _r(a["benign"].get(s)) for s in skills})
            row.update({f"task:{t}": _r(a["tasks"].get(t)) for t in tasks})
            w.writerow(row)
    return buf.getvalue()


def _r(x: float | None) -> Any:
    return "" if x is None else repr(float(x))


# ---------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(ax, pts: list[dict[str, Any]], label: str, color: str, style: str) -> None:
    pts = [p for p in pts if p["general"] is not None and p["skill"] is not None]
    if pts:
        ax.plot([p["general"] for p in pts], [p["skill"] for p in pts], style, color=color, label=label, ms=5)


def figure(res: dict[str, Any], path: str, methods: list[str], title: str) -> None:
    """General (x) vs skill (y) on validation: a curve per method, theta_G and the heuristic point marked."""
    plt = _plt()
    skills = list(res["curves"])
    fig, axes = plt.subplots(1, max(len(skills), 1), figsize=(4.6 * max(len(skills), 1), 4.2), squeeze=False)
    for ax, s in zip(axes[0], skills, strict=False):
        cv = res["curves"][s]
        for m in methods:
            label, color, style = METHOD_STYLE[m]
            _curve(ax, cv.get(m, []), label, color, style)
            h = [p for p in cv.get(f"{m}_heuristic", []) if p["general"] is not None]
            if h:
                ax.plot(
                    h[0]["general"],
                    h[0]["skill"],
                    "*",
                    color=color,
                    ms=15,
                    mec="black",
                    label=f"{METHOD_STYLE[m][0]}, omega=|D|/|G|",
                )
        for p in cv.get("general", []):
            ax.plot(p["general"], p["skill"], "kX", ms=10, label="instruction-tuned theta_G")
        ax.set_xlabel("general score (validation, %)")
        ax.set_ylabel(f"{s} score (validation, %)")
        ax.set_title(s)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(plt, fig, path)


def cosine_figure(res: dict[str, Any], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for pair, v in res["cosine"].items():
        ax.plot(range(len(v["layers"])), v["layers"], "o-", label=pair)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(tau_a, tau_b)")
    ax.set_title("task-vector similarity per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _save(plt, fig, path: str) -> None:
    """PNG bytes through the results-dir layer (local or gs://, atomic, process 0)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    files.write_bytes(path, buf.getvalue())


def write_report(res: dict[str, Any], out_dir: str) -> list[str]:
    """Write results.json, results.csv, tables.md and the figures into `out_dir`; returns the paths."""
    paths = []

    def put(name: str, text: str) -> None:
        p = files.join(out_dir, name)
        files.write_text(p, text)
        paths.append(p)

    put("results.json", json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    put("results.csv", csv_text(res))
    put("tables.md", markdown(res))
    methods = [
        m
        for m in ("task_arithmetic", "linear_interpolation", "wise_ft")
        if any(m in c for c in res["curves"].values())
    ]
    figure(
        res,
        files.join(out_dir, FIG1),
        ["cft", "rt", "task_arithmetic"],
        "Figure 1: CFT vs RT vs PTM (validation)",
    )
    figure(res, files.join(out_dir, FIG3), methods, "Figure 3: merge variants over omega (validation)")
    paths += [files.join(out_dir, FIG1), files.join(out_dir, FIG3)]
    if res.get("cosine"):
        cosine_figure(res, files.join(out_dir, FIG_COS))
        paths.append(files.join(out_dir, FIG_COS))
    return paths
