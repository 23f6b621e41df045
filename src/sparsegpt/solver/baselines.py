"""Baselines on SparseGPT's interface: magnitude pruning and Wanda (Sun et al. 2023). No weight update."""

from __future__ import annotations

import torch

from sparsegpt.solver.masks import lowest_k, lowest_k_per_row, n_of_m, pruned_count
from sparsegpt.solver.sparsegpt import NMPattern, SolveResult


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> SolveResult:
    return SolveResult(weight=weight.masked_fill(mask, 0.0), mask=mask, damp=0.0, dead_inputs=0)


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: NMPattern | None = None) -> SolveResult:
    """Zero the smallest |W_ij| of the whole layer (rows, cols), or the N smallest of every M-group."""
    weight = weight.float() if weight.dtype != torch.float64 else weight
    scores = weight.abs()
    if pattern is not None:
        return _apply(weight, n_of_m(scores, pattern.n, pattern.m))
    return _apply(weight, lowest_k(scores, pruned_count(sparsity, weight.numel())))


def wanda_prune(
    weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float, pattern: NMPattern | None = None
) -> SolveResult:
    """Zero the weights of lowest |W_ij| · ‖X_j‖₂, compared within each output row (or each N:M group).

    ``column_norms`` (cols,) holds the input norms ‖X_j‖₂ over the calibration tokens.
    """
    weight = weight.float() if weight.dtype != torch.float64 else weight
    scores = wanda_scores(weight, column_norms)
    if pattern is not None:
        return _apply(weight, n_of_m(scores, pattern.n, pattern.m))
    return _apply(weight, lowest_k_per_row(scores, sparsity))


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's saliency |W_ij| · ‖X_j‖₂ of each weight (rows, cols), in the weight's dtype."""
    return weight.abs() * column_norms.to(weight.dtype).unsqueeze(0)


def layer_loss(weight: torch.Tensor, original: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ_rows (ŵ − w)ᵀ H (ŵ − w) in float64: the output energy that ``weight`` loses against ``original``."""
    delta = (weight - original).to(torch.float64)
    return float(((delta @ hessian.to(torch.float64)) * delta).sum())


def relative_output_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs, from H ∝ XᵀX: the share of output energy lost.

    A figure to report: the products run in H's precision (float32 is several times faster than float64
    here, and the loss is formed from W − Ŵ itself, so nothing cancels), their sums in float64."""
    rows = original.shape[0]
    stacked = torch.cat([pruned - original, original]).to(hessian.dtype)
    energies = ((stacked @ hessian) * stacked).sum(dim=1, dtype=torch.float64)
    lost, kept = float(energies[:rows].sum()), float(energies[rows:].sum())
    return lost / kept if kept > 0 else 0.0
