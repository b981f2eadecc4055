"""Look inside checkpoints without loading them: tensor listings and task-vector comparisons.

`diff` streams two checkpoints (and optionally their common base) piece by piece and reports per-tensor
norms of the
task vectors A-P and B-P and their cosine similarity, also aggregated per layer (axis 0 of stacked `layers.*`
tensors, or the `layers.N.` index of HF names) — the per-layer interference measure of the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ptm.ckpt import stores as S
from ptm.ckpt import tree
from ptm.ckpt.writers import chunk_shape
from ptm.merge import engine


def inspect_checkpoint(path: str) -> list[S.TensorInfo]:
    return list(S.open_store(path).tensors().values())


def format_inspect(path: str) -> str:
    st = S.open_store(path)
    infos = list(st.tensors().values())
    w = max((len(i.name) for i in infos), default=4)
    lines = [
        f"{path} ({st.kind}, {len(infos)} tensors)",
        f"{'name':<{w}}  {'shape':<24} {'dtype':<9} {'MiB':>9}",
    ]
    for i in infos:
        lines.append(f"{i.name:<{w}}  {str(list(i.shape)):<24} {str(i.dtype):<9} {i.nbytes / 2**20:>9.2f}")
    total = sum(i.nbytes for i in infos)
    params = sum(math.prod(i.shape) for i in infos)
    lines.append(f"total: {params:,} parameters, {total / 2**20:.1f} MiB")
    return "\n".join(lines)


@dataclass
class _Acc:
    dot: float = 0.0
    aa: float = 0.0
    bb: float = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        self.dot += float(a64 @ b64)
        self.aa += float(a64 @ a64)
        self.bb += float(b64 @ b64)

    @property
    def cos(self) -> float:
        d = math.sqrt(self.aa) * math.sqrt(self.bb)
        return self.dot / d if d > 0 else float("nan")


@dataclass
class DiffResult:
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> norm_a, norm_b, cos
    layers: dict[int, float] = field(default_factory=dict)  # layer -> cosine over all its tensors
    total_cos: float = float("nan")

    def format(self) -> str:
        w = max((len(n) for n in self.tensors), default=4)
        lines = [f"{'tensor':<{w}}  {'|A-P|':>12} {'|B-P|':>12} {'cos':>8}"]
        for n, r in self.tensors.items():
            lines.append(f"{n:<{w}}  {r['norm_a']:>12.5g} {r['norm_b']:>12.5g} {r['cos']:>8.4f}")
        lines.append("per layer:")
        for layer, c in sorted(self.layers.items()):
            lines.append(f"  layer {layer:>3}: cos {c:.4f}")
        lines.append(f"all tensors: cos {self.total_cos:.4f}")
        return "\n".join(lines)


def diff(a: str, b: str, base: str | None = None) -> DiffResult:
    """Task-vector comparison of A and B relative to `base` (or of A and B themselves when no base)."""
    stores = [S.open_store(p) for p in ([a, b] + ([base] if base else []))]
    infos = engine.check_compatible(stores)
    res = DiffResult()
    per_layer: dict[int, _Acc] = {}
    total = _Acc()
    for name, info in infos.items():
        acc = _Acc()
        chunk = chunk_shape(info.shape, 4, engine.PIECE_BYTES)
        stacked = tree.is_stacked_layer(name) and len(info.shape) > 0
        hf = tree.layer_of(name)
        for p in engine.pieces(engine._norm_index((), info.shape), chunk):
            xa, xb = (s.read(name, p).astype(np.float32) for s in stores[:2])
            if base:
                xp = stores[2].read(name, p).astype(np.float32)
                xa, xb = xa - xp, xb - xp
            acc.add(xa, xb)
            total.add(xa, xb)
            if stacked:
                for r in range(xa.shape[0]):
                    per_layer.setdefault(p[0].start + r, _Acc()).add(xa[r], xb[r])
            elif hf is not None:
                per_layer.setdefault(hf, _Acc()).add(xa, xb)
        res.tensors[name] = {"norm_a": math.sqrt(acc.aa), "norm_b": math.sqrt(acc.bb), "cos": acc.cos}
    res.layers = {k: v.cos for k, v in sorted(per_layer.items())}
    res.total_cos = total.cos
    return res


def layer_cosines(a: str, b: str, base: str) -> list[float]:
    """Cosine similarity of the task vectors a-base and b-base, per layer (index = layer)."""
    layers = diff(a, b, base).layers
    return [layers[i] for i in sorted(layers)]
