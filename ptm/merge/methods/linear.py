"""Linear methods: task arithmetic (paper Eq. 1-2), linear interpolation (Eq. 3-4), WiSE-FT (Eq. 5-6), model
soups, LiNeS' depth-scaled task vectors, passthrough and nearswap."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ptm.errors import MergeError
from ptm.merge.methods.base import (
    _GTA,
    Arrays,
    Context,
    Method,
    SharedBlock,
    _anchor,
    _consensus_sum,
    _count,
    _f32,
    _taus,
    register,
)


def task_arithmetic(x: Arrays, w: list[float], ctx: Context, general_weight: float = 1.0) -> np.ndarray:
    """theta_G + sum_k omega_k (theta_k - theta_pre) (paper Eq. 1-2); anchor = pre when no general is
    given; `general_weight` w_G != 1 makes the anchor theta_pre + w_G (theta_G - theta_pre)."""
    pre = x["pre"]
    out = np.array(_anchor(x, general_weight), dtype=np.float32, copy=True)
    for s, wk in zip(x["skills"], w, strict=True):
        out += _f32(wk) * (s - pre)
    return out


def task_arithmetic_shared(roles: dict[str, Any], w: list[float], bufs: list[np.ndarray],
                           shared: SharedBlock, general_weight: float = 1.0) -> np.ndarray:
    """Bit-identical to `task_arithmetic` (anchor + w_0 tau_0 + w_1 tau_1 ..., same rounding order), but each
    tau = skill - pre is computed once per block for all jobs of a pass (a sweep) instead of once per job."""
    pre = roles["pre"]
    anchor = bufs[roles.get("general", pre)]
    if general_weight != 1:
        anchor = _anchor({"pre": bufs[pre], **({"general": anchor} if "general" in roles else {})}, general_weight)
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


def nearswap(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """Per element, lerp base -> other by clamp(t / |base - other|, 0, 1) (1 where they are equal)."""
    a, b = x["models"]
    t = _f32(w[0])
    d = np.abs(np.subtract(a, b, dtype=np.float32))
    if t < 0:  # t / 0 = -inf would clip to 0 where the rule says 1
        with np.errstate(divide="ignore", invalid="ignore"):
            lw = np.where(d != 0, t / d, np.float32(1))
        lw = np.clip(np.nan_to_num(lw, nan=1.0, posinf=1.0, neginf=1.0), 0, 1).astype(np.float32)
        return a * (np.float32(1) - lw) + b * lw
    # In place, the same float32 operations: t / d is in [0, inf] or NaN (0 / 0, a NaN input), and fmin maps
    # inf and NaN to 1 as the rule (and mergekit's clamp after nan_to_num) does.
    with np.errstate(divide="ignore", invalid="ignore"):
        lw = np.divide(t, d, out=d)
    np.fmin(lw, np.float32(1), out=lw)
    out = np.subtract(np.float32(1), lw)
    np.multiply(a, out, out=out)
    np.multiply(b, lw, out=lw)
    out += lw
    return out


def passthrough(x: Arrays, w: list[float], ctx: Context) -> np.ndarray:
    """The one model's tensor times `scale` = omega (1: a plain copy)."""
    out = np.array(x["models"][0], dtype=np.float32, copy=True)
    if w[0] != 1:
        out *= _f32(w[0])
    return out


def lines(x: Arrays, w: list[float], ctx: Context, alpha: float = 0.0, beta: float = 1.0) -> np.ndarray:
    """LiNeS: anchor + lambda(l) sum_k omega_k tau_k with lambda(l) = alpha + beta l / (L - 1) for layer l of L;
    non-layer tensors (embeddings, final norm, head) take alpha."""
    l_, n = ctx.layer, ctx.n_layers
    lam = alpha + (beta * l_ / (n - 1) if n > 1 else beta) if l_ is not None else alpha
    mixed = _consensus_sum(_taus(x), w, consensus=False, normalize=False)
    return np.array(_anchor(x), dtype=np.float32) + _f32(lam) * mixed


register(Method("nearswap", nearswap, ("models",), (), "omega", {}, check_inputs=_count("models", 2, 2),
                doc="lerp by clamp(t/|a-b|, 0, 1)"))
register(Method("passthrough", passthrough, ("models",), (), "omega", {}, check_inputs=_count("models", 1, 1),
                doc="one model's tensors times scale = omega"))
register(Method("lines", lines, _GTA, ("general",), "skills", {"alpha": 0.0, "beta": 1.0},
                doc="anchor + (alpha + beta l/(L-1)) sum w tau"))
register(
    Method(
        "task_arithmetic",
        task_arithmetic,
        ("pre", "skills"),
        ("general",),
        "skills",
        {"general_weight": 1.0},
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
    Method("linear", linear, ("models",), (), "models", {"normalize": False}, doc="sum_i alpha_i theta_i",
           mergekit_defaults={"normalize": True})
)
