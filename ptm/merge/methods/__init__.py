"""Merge methods: pure float32 array functions in a registry keyed by name (no I/O).

Every method is elementwise *given* per-unit statistics (TIES' trim thresholds, SLERP's Gram matrix) and the
global flat index of each element (DARE's random mask), so the engine may call it on any slice of a tensor — a
shard, a cache-sized block — and get exactly the bits the whole-tensor call would; "matrix" methods (SVD) get
whole units. Inputs arrive as a dict of roles: `pre` (theta_pre), `general` (theta_G), `skills` (list of
theta_D), `cft` (theta_CFT), `models` (list). Weights are plain floats here; layer schedules and per-tensor
overrides are resolved by the engine. Families: `linear`, `sparse`, `spherical`, `spectral`; the registry and
shared helpers: `base`. Importing this package registers every family's methods.
"""

from ptm.merge.methods import linear, sparse, spectral, spherical
from ptm.merge.methods.base import (
    CONVENTIONS,
    REGISTRY,
    Context,
    FlatIndex,
    Method,
    Run,
    SharedBlock,
    as_matrix,
    check_options,
    get,
    kth_largest_abs,
    merge_threads,
    register,
    uniform_from_index,
)
from ptm.merge.methods.linear import linear_interpolation, nearswap, task_arithmetic, wise_ft
from ptm.merge.methods.sparse import dare, ties, ties_unit_stats
from ptm.merge.methods.spectral import iso_c, iso_cts, tsv
from ptm.merge.methods.spherical import (
    model_stock_t,
    multislerp_coefficients,
    slerp_coefficients,
    sphere_mean_coefficients,
)

__all__ = [
    "CONVENTIONS", "REGISTRY", "Context", "FlatIndex", "Method", "Run", "SharedBlock", "as_matrix", "check_options",
    "dare", "get", "iso_c", "iso_cts", "kth_largest_abs", "linear", "linear_interpolation", "merge_threads",
    "model_stock_t", "multislerp_coefficients", "nearswap",
    "register", "slerp_coefficients", "sparse", "spectral", "sphere_mean_coefficients", "spherical", "task_arithmetic",
    "ties", "ties_unit_stats", "tsv", "uniform_from_index", "wise_ft",
]
