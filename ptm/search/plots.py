"""The study's two figures: convergence (every candidate, running best, baselines) and the Pareto front."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ptm.search.objective import Objective


def plot_convergence(cands: list[dict], baselines: dict[str, dict], primary: Objective, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = [primary(r["info"]["scores"]) for r in cands]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(range(1, len(vals) + 1), vals, s=10, color="0.6", label="candidate")
    ax.plot(range(1, len(vals) + 1), np.maximum.accumulate(vals), color="C0", label="best so far")
    ref: dict[str, float] = {}  # the best configuration of each baseline family on validation
    for n, r in baselines.items():
        fam = "best single" if n.startswith("member[") else n.split("(")[0].replace("_", " ")
        ref[fam] = max(ref.get(fam, -math.inf), r["value"])
    for k, (n, v) in enumerate(ref.items()):
        ax.axhline(v, linestyle="--", linewidth=1, color=f"C{k + 1}", label=n)
    ax.set_xlabel("candidate evaluation")
    label = primary.label if len(primary.label) <= 30 else f"macro-average of {len(primary.weights)} tasks"
    ax.set_ylabel(f"validation objective\n({label})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_front(summary: dict, cands: list[dict], baselines: dict[str, dict], objs: Sequence[Objective],
                path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = np.array([r["info"]["objectives"] for r in cands])
    front = np.array([p["val"] for p in summary["pareto"]["front"]])
    fig, ax = plt.subplots(figsize=(6, 5))
    c = pts[:, 2] if pts.shape[1] > 2 else None
    ax.scatter(pts[:, 0], pts[:, 1], s=10, c=c if c is not None else "0.7", label="candidates")
    order = np.argsort(front[:, 0])
    ax.plot(front[order, 0], front[order, 1], "o-", color="C3", label="non-dominated (validation)")
    for n, r in baselines.items():
        v = r["objectives"]
        single = n.startswith("member[")
        ax.scatter([v[0]], [v[1]], marker="x" if single else "^", s=40, label=None if single else n,
                   color="k" if single else None)
    ax.set_xlabel(objs[0].label)
    ax.set_ylabel(objs[1].label)
    ax.set_title("Pareto front" + (f" (colour: {objs[2].label})" if len(objs) > 2 else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
