"""Merge methods: pure float32 array functions in a registry keyed by name (no I/O).

Every method is elementwise *given* per-tensor statistics (TIES' trim thresholds) and the global flat index of
each element (DARE's random mask), so the engine may call it on any slice of a tensor — a shard, a cache-sized
block — and get exactly the bits the whole-tensor call would. Inputs arrive as a dict of roles:
`pre` (theta_pre), `general` (theta_G), `skills` (list of theta_D), `cft` (theta_CFT), `models` (list).
Weights are plain floats here; layer schedules and per-tensor overrides are resolved by the engine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptm.errors import MergeError

Arrays = dict[str, Any]  # role -> np.ndarray or list[np.ndarray]


@dataclass
class Context:
    """What a method may know about the slice it combines besides the values."""

    name: str = ""
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    flat_index: Callable[[], np.ndarray] | None = None  # global flat indices (uint64) of the slice's elements


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., np.ndarray]
    required: tuple[str, ...]  # roles that must be given
    optional: tuple[str, ...]  # roles that may be given
    weighted: str  # the role whose entries the weights belong to ("skills", "models") or "omega" (one scalar)
    options: dict[str, Any]  # option name -> default
    stats: Callable[..., dict[str, Any]] | None = None  # per-tensor statistics (see tensor_stats)
    doc: str = ""
    # Optional fast path for the engine's blocks: fn(roles, weights, bufs, shared, **opts) -> block, bit-identical
    # to `fn`, where `roles` maps each role to indices into `bufs` (one float32 block per input) and `shared`
    # (a SharedBlock) lets the jobs of one pass (a sweep) reuse intermediate results.
    shared_fn: Callable[..., np.ndarray] | None = None
    check_inputs: Callable[[dict[str, Any]], str | None] | None = None  # a problem with the inputs, or None

    def n_weights(self, inputs: dict[str, Any]) -> int:
        if self.weighted == "omega":
            return 1
        return len(inputs.get(self.weighted) or [])


class SharedBlock:
    """Scratch space for methods' fast paths over one block of elements: `memo` holds results any job of the
    pass may reuse (cleared for every block); `scratch(key)` is a persistent buffer of the block's length."""

    def __init__(self, capacity: int):
        self.capacity, self.m = capacity, 0
        self.memo: dict[Any, np.ndarray] = {}
        self._bufs: dict[Any, np.ndarray] = {}

    def start(self, m: int) -> None:
        self.m = m
        self.memo.clear()

    def scratch(self, key: Any) -> np.ndarray:
        return self._bufs.setdefault(key, np.empty(self.capacity, np.float32))[: self.m]


REGISTRY: dict[str, Method] = {}


def register(m: Method) -> Method:
    REGISTRY[m.name] = m
    return m


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise MergeError(f"unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def _f32(w: float) -> np.float32:
    return np.float32(w)


# --------------------------------------------------------------------------------------------------- methods


def task_arithmetic(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """theta_G + sum_k omega_k (theta_k - theta_pre) (paper Eq. 1-2); anchor = pre when no general is
    given."""
    pre = x["pre"]
    out = np.array(x.get("general", pre), dtype=np.float32, copy=True)
    for s, wk in zip(x["skills"], w, strict=True):
        out += _f32(wk) * (s - pre)
    return out


def task_arithmetic_shared(roles: dict[str, Any], w: list[float], bufs: list[np.ndarray],
                           shared: SharedBlock) -> np.ndarray:
    """Bit-identical to `task_arithmetic` (anchor + w_0 tau_0 + w_1 tau_1 ..., same rounding order), but each
    tau = skill - pre is computed once per block for all jobs of a pass (a sweep) instead of once per job."""
    pre = roles["pre"]
    anchor = bufs[roles.get("general", pre)]
    out = shared.scratch("task_arithmetic.out")
    if not roles["skills"]:
        out[...] = anchor
        return out
    for k, (si, wk) in enumerate(zip(roles["skills"], w, strict=True)):
        key = ("tau", si, pre)
        if key not in shared.memo:
            tau = shared.scratch(key)
            np.subtract(bufs[si], bufs[pre], out=tau)
            shared.memo[key] = tau
        tau = shared.memo[key]
        if k == 0:
            np.multiply(tau, np.float32(wk), out=out)
            np.add(anchor, out, out=out)  # anchor + w tau (addition commutes)
        else:
            out += np.float32(wk) * tau
    return out


def linear_interpolation(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """theta_pre + omega tau_D + (1 - omega) tau_G (Eq. 3-4)."""
    pre, omega = x["pre"], _f32(w[0])
    return pre + omega * (x["skills"][0] - pre) + (np.float32(1) - omega) * (x["general"] - pre)


def wise_ft(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """theta_G + omega (theta_CFT - theta_G) (Eq. 5-6)."""
    g = x["general"]
    return g + _f32(w[0]) * (x["cft"] - g)


def linear(x: Arrays, w: list[float], ctx: Context, normalize: bool = False) -> np.ndarray:
    """Model soup sum_i alpha_i theta_i. No renormalisation unless normalize=True (then divided by sum
    alpha)."""
    out = np.zeros_like(x["models"][0], dtype=np.float32)
    for m, a in zip(x["models"], w, strict=True):
        out += _f32(a) * m
    if normalize:
        total = math.fsum(w)
        if total == 0:
            raise MergeError("linear merge with normalize=True needs weights that do not sum to 0")
        out /= np.float32(total)
    return out


def _anchor(x: Arrays) -> np.ndarray:
    return x.get("general", x["pre"])


def ties(x: Arrays, w: list[float], ctx: Context, density: float = 1.0, normalize: bool = True) -> np.ndarray:
    """TIES: trim each task vector to its top-`density` magnitudes, elect the sign of the weighted sum, and
    take the
    (weight-)mean of the entries that agree with it. Weights are applied before the vote (as mergekit
    does)."""
    pre = x["pre"]
    thr = ctx.stats.get("thresholds") or [0.0] * len(x["skills"])
    weighted = []
    for s, wk, t in zip(x["skills"], w, thr, strict=True):
        tau = s - pre
        if t > 0:
            tau[np.abs(tau) < np.float32(t)] = 0
        weighted.append(_f32(wk) * tau)
    total = np.zeros_like(pre, dtype=np.float32)
    for v in weighted:
        total += v
    sign = np.sign(total)
    mixed = np.zeros_like(total)
    divisor = np.zeros_like(total)
    for v, wk in zip(weighted, w, strict=True):
        agree = (np.sign(v) == sign) & (v != 0)
        mixed += np.where(agree, v, np.float32(0))
        divisor += np.where(agree, _f32(wk), np.float32(0))
    if normalize:
        divisor[np.abs(divisor) < 1e-8] = 1
        mixed /= divisor
    return _anchor(x) + mixed


def ties_stats(
    tau_blocks: Callable[[int], Iterable[np.ndarray]],
    n_skills: int,
    numel: int,
    density: float = 1.0,
    **_: Any,
) -> dict[str, Any]:
    """Per skill, the magnitude of the ceil(density * numel)-th largest task-vector entry (kept: |tau| >=
    it)."""
    if density >= 1.0:
        return {"thresholds": [0.0] * n_skills}
    k = max(1, math.ceil(density * numel))
    return {"thresholds": [kth_largest_abs(tau_blocks(i), k) for i in range(n_skills)]}


def kth_largest_abs(blocks: Callable[[], Iterable[np.ndarray]] | Iterable[np.ndarray], k: int) -> float:
    """Exact k-th largest |x| over a stream of float32 blocks in O(block) memory: two 16-bit radix passes
    over the
    IEEE bit patterns (for non-negative floats the bit pattern orders like the value). `blocks` is iterated
    twice,
    so pass a callable that restarts the stream."""
    make = blocks if callable(blocks) else (lambda b=list(blocks): iter(b))
    hi = np.zeros(1 << 16, np.int64)
    for b in make():
        hi += np.bincount(np.abs(b, dtype=np.float32).view(np.uint32).ravel() >> 16, minlength=1 << 16)
    above = np.cumsum(hi[::-1])[::-1]  # above[i] = count with high bits >= i
    top = int(np.nonzero(above >= k)[0].max())
    k_in = k - (int(above[top + 1]) if top + 1 < (1 << 16) else 0)
    lo = np.zeros(1 << 16, np.int64)
    for b in make():
        u = np.abs(b, dtype=np.float32).view(np.uint32).ravel()
        lo += np.bincount(u[(u >> 16) == top] & 0xFFFF, minlength=1 << 16)
    above_lo = np.cumsum(lo[::-1])[::-1]
    low = int(np.nonzero(above_lo >= k_in)[0].max())
    return float(np.array([(top << 16) | low], np.uint32).view(np.float32)[0])


def _key(seed: int, name: str, k: int) -> np.uint64:
    h = hashlib.blake2b(f"{seed}\0{name}\0{k}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(h, "little"))


def uniform_from_index(seed: int, name: str, k: int, flat_index: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (key(seed, name, k) + index * golden). A shard computes
    the same bits as the whole tensor because the only inputs are the element's global flat index and the
    key."""
    with np.errstate(over="ignore"):
        z = flat_index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + _key(seed, name, k)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def dare(x: Arrays, w: list[float], ctx: Context, drop_rate: float = 0.1) -> np.ndarray:
    """DARE (linear): drop each task-vector entry with probability p, rescale the rest by 1/(1-p), then
    anchor + sum_k omega_k tau_k'. The mask of skill k at element i is a function of (seed, tensor name, k,
    i)."""
    pre = x["pre"]
    out = np.array(_anchor(x), dtype=np.float32, copy=True)
    idx = (
        ctx.flat_index()
        if ctx.flat_index is not None
        else np.arange(pre.size, dtype=np.uint64).reshape(pre.shape)
    )
    scale = np.float32(1.0) / np.float32(1.0 - drop_rate)
    for k, (s, wk) in enumerate(zip(x["skills"], w, strict=True)):
        keep = uniform_from_index(ctx.seed, ctx.name, k, idx) >= np.float32(drop_rate)
        tau = (s - pre) * scale
        out += _f32(wk) * np.where(keep, tau, np.float32(0))
    return out


register(
    Method(
        "task_arithmetic",
        task_arithmetic,
        ("pre", "skills"),
        ("general",),
        "skills",
        {},
        doc="theta_G + sum_k omega_k (theta_k - theta_pre)",
        shared_fn=task_arithmetic_shared,
    )
)
register(
    Method(
        "linear_interpolation",
        linear_interpolation,
        ("pre", "general", "skills"),
        (),
        "omega",
        {},
        doc="theta_pre + omega tau_D + (1-omega) tau_G",
        check_inputs=lambda inputs: None if len(inputs.get("skills") or []) == 1 else "takes exactly one skill",
    )
)
register(
    Method(
        "wise_ft", wise_ft, ("general", "cft"), (), "omega", {}, doc="theta_G + omega (theta_CFT - theta_G)"
    )
)
register(
    Method("linear", linear, ("models",), (), "models", {"normalize": False}, doc="sum_i alpha_i theta_i")
)
register(
    Method(
        "ties",
        ties,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"density": 1.0, "normalize": True},
        stats=ties_stats,
        doc="trim, elect sign, disjoint mean",
    )
)
register(
    Method(
        "dare",
        dare,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"drop_rate": 0.1},
        doc="random drop p, rescale 1/(1-p), task arithmetic",
    )
)


def check_options(method: Method, opts: dict[str, Any]) -> dict[str, Any]:
    """Method options with defaults filled in; ranges checked (density and drop rate in (0, 1])."""
    out = dict(method.options)
    for k, v in opts.items():
        if v is None:
            continue
        if k not in method.options:
            raise MergeError(
                f"method {method.name!r} takes no option {k!r} (options: {sorted(method.options)})"
            )
        out[k] = v
    for k in ("density", "drop_rate"):
        if k in out and not (isinstance(out[k], int | float) and 0 < out[k] <= 1):
            raise MergeError(f"{k} must be in (0, 1], got {out[k]!r}")
    if out.get("drop_rate") == 1:
        raise MergeError(
            "drop_rate 1 drops every entry (rescale 1/(1-p) is undefined); use a value in (0, 1)"
        )
    return out
