"""Pure tensor math: input statistics, the SparseGPT sweep, exact masks and baselines. No nn.Module here."""

from sparsegpt.solver.baselines import magnitude_prune, relative_output_error, wanda_prune
from sparsegpt.solver.hessian import InputStatistics
from sparsegpt.solver.masks import lowest_k, lowest_k_per_row, n_of_m, pruned_count, split_count
from sparsegpt.solver.sparsegpt import (
    InverseFactor,
    NMPattern,
    SolveResult,
    inverse_factor,
    inverse_hessian_cholesky,
    sparsegpt_prune,
)

__all__ = [
    "InputStatistics",
    "InverseFactor",
    "NMPattern",
    "SolveResult",
    "inverse_factor",
    "inverse_hessian_cholesky",
    "lowest_k",
    "lowest_k_per_row",
    "magnitude_prune",
    "n_of_m",
    "pruned_count",
    "relative_output_error",
    "sparsegpt_prune",
    "split_count",
    "wanda_prune",
]
