"""After the sweep: better weights for a fixed mask, better masks at a fixed sparsity, other mask scores.

The layer's loss for one output row is e(ŵ) = (ŵ − w)ᵀ H (ŵ − w): the output energy lost on the
calibration inputs (H ∝ XᵀX). SparseGPT's sweep approximates its minimum over ŵ supported on the row's
kept weights (each pruning error is compensated only on the columns right of it); the exact minimum
solves H_KK ŵ_K = H_K: w, row by row with each row's own support K.

- ``refine_weights``: preconditioned conjugate gradients on those systems, batched over rows (one
  (rows, cols) × (cols, cols) product per iteration), started from the sweep's weights.
- ``repair_mask``: prune-and-grow swaps inside a row (inside an N:M group for patterns), each taken only
  when it lowers e at equal sparsity.
- ``mask_scores``: the Wanda and RIA saliencies, to fix a mask before the sweep instead of choosing it
  adaptively.

Every function returns weights whose loss is at most the loss of the weights it was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsegpt.solver.baselines import layer_loss, wanda_scores
from sparsegpt.solver.masks import lowest_k_per_row, n_of_m
from sparsegpt.solver.sparsegpt import prepare_hessian

MASK_SCORES = ("sparsegpt", "wanda", "ria")


@dataclass
class RefineResult:
    """Refined weights (rows, cols), the layer loss before and after, and the iterations run."""

    weight: torch.Tensor
    loss_before: float
    loss_after: float
    iterations: int


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H + λI with λ = damp · mean(diag H), as the sweep factorizes it (a copy, dead inputs with a unit
    diagonal: ``prepare_hessian``)."""
    result, _ = prepare_hessian(hessian)
    result.diagonal().add_(damp * result.diagonal().mean())
    return result


def refine_weights(
    weight: torch.Tensor,
    original: torch.Tensor,
    hessian: torch.Tensor,
    pruned: torch.Tensor,
    iterations: int,
    damp: float = 0.01,
    tolerance: float = 1e-4,
) -> RefineResult:
    """Move the kept weights of ``weight`` (rows, cols) towards the least-squares optimum on their support.

    ``original`` is the dense weight, ``hessian`` H (cols, cols), ``pruned`` the mask (True = zero, kept
    zero). Runs at most ``iterations`` steps of conjugate gradients with a Jacobi preconditioner on the
    damped H (the sweep's, which also keeps the systems of dead inputs well posed); stops once a step
    lowers the damped loss by less than ``tolerance`` of what is left. The result is kept only when the
    undamped loss did not rise.
    """
    compute = weight.dtype
    system = damped(hessian.to(compute), damp)
    kept = (~pruned).to(compute)
    inverse_diagonal = 1.0 / system.diagonal()
    refined = weight.clone()
    half_gradient = (refined - original) @ system
    loss_left = float((half_gradient * (refined - original)).sum())
    residual = -half_gradient * kept  # on the support
    del half_gradient
    preconditioned = residual * inverse_diagonal
    direction = preconditioned.clone()
    alignment = (residual * preconditioned).sum(dim=1)
    done = 0
    while done < iterations:
        done += 1
        product = (direction @ system) * kept
        curvature = (direction * product).sum(dim=1)
        step = torch.where(curvature > 0, alignment / curvature.clamp_min(torch.finfo(compute).tiny), 0.0)
        refined.addcmul_(step.unsqueeze(1), direction)
        residual.addcmul_(step.unsqueeze(1), product, value=-1.0)
        decrease = float((step * alignment).sum())  # the loss drop of this step, exactly, for a quadratic
        loss_left -= decrease
        if decrease <= tolerance * max(loss_left, 0.0):
            break
        preconditioned = residual * inverse_diagonal
        new_alignment = (residual * preconditioned).sum(dim=1)
        ratio = torch.where(alignment > 0, new_alignment / alignment.clamp_min(torch.finfo(compute).tiny), 0.0)
        direction = preconditioned + ratio.unsqueeze(1) * direction
        alignment = new_alignment
    refined.masked_fill_(pruned, 0.0)
    before, after = layer_loss(weight, original, hessian), layer_loss(refined, original, hessian)
    if after > before:
        return RefineResult(weight, before, before, done)
    return RefineResult(refined, before, after, done)


def repair_mask(
    weight: torch.Tensor,
    original: torch.Tensor,
    hessian: torch.Tensor,
    pruned: torch.Tensor,
    rounds: int,
    group: int | None = None,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prune-and-grow: in every row, up to ``rounds`` times, zero one kept weight and revive one pruned
    weight (inside the same group of ``group`` inputs for N:M masks) when the pair lowers the row's loss.

    The weight that is pruned is the one whose removal costs least, x_k² H_kk − 2 x_k g_k (g = H(x − w));
    the one that grows is the one whose best value gains most after that removal, g'_j² / H_jj; the swap
    is taken when the two together lower the loss. Uses the damped H. Returns (weight, mask, swaps made).
    """
    compute = weight.dtype
    system = damped(hessian.to(compute), damp)
    diagonal = system.diagonal()
    current, mask = weight.clone(), pruned.clone()
    gradient = (current - original) @ system
    rows = torch.arange(current.shape[0], device=current.device)
    infinity = torch.tensor(float("inf"), dtype=compute, device=current.device)
    swaps = 0
    for _ in range(rounds):
        removal_cost = torch.where(mask, infinity, current.square() * diagonal - 2 * current * gradient)
        growth_gain = torch.where(mask, gradient.square() / diagonal, -infinity)
        if group is None:
            prune_at = removal_cost.argmin(dim=1)
            grow_at = growth_gain.argmax(dim=1)
        else:  # the best pair inside each group, then the group whose pair looks best
            shape = (current.shape[0], -1, group)
            group_cost, prune_in = removal_cost.view(shape).min(dim=2)
            group_gain, grow_in = growth_gain.view(shape).max(dim=2)
            chosen = (group_cost - group_gain).argmin(dim=1)
            prune_at = chosen * group + prune_in[rows, chosen]
            grow_at = chosen * group + grow_in[rows, chosen]
        removed = current[rows, prune_at]
        cost = removal_cost[rows, prune_at]
        coupled = gradient[rows, grow_at] - removed * system[prune_at, grow_at]  # g_j once x_k is zero
        change = cost - coupled.square() / diagonal[grow_at]
        # a row with nothing pruned (or nothing kept) has no pair: its argmin/argmax point anywhere
        take = (change < 0) & torch.isfinite(change) & mask[rows, grow_at] & ~mask[rows, prune_at]
        if not bool(take.any()):
            break
        rows_taken, prune_taken, grow_taken = rows[take], prune_at[take], grow_at[take]
        grown = -coupled[take] / diagonal[grow_taken]
        gradient[rows_taken] += (
            grown.unsqueeze(1) * system[grow_taken] - removed[take].unsqueeze(1) * system[prune_taken]
        )
        current[rows_taken, prune_taken] = 0.0
        current[rows_taken, grow_taken] = grown
        mask[rows_taken, prune_taken] = True
        mask[rows_taken, grow_taken] = False
        swaps += int(take.sum())
    if layer_loss(current, original, hessian) > layer_loss(weight, original, hessian):
        return weight, pruned, 0
    return current, mask, swaps


def mask_scores(kind: str, weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """Saliency (rows, cols) of each weight, lower = pruned first: Wanda |W_ij|·‖X_j‖, or RIA
    (|W_ij|/Σ_j|W_ij| + |W_ij|/Σ_i|W_ij|)·‖X_j‖^½ (Zhang et al. 2024)."""
    if kind == "wanda":
        return wanda_scores(weight, column_norms)
    if kind == "ria":
        magnitude = weight.abs()
        tiny = torch.finfo(weight.dtype).tiny
        relative = magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
        relative += magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
        return relative * column_norms.to(weight.dtype).unsqueeze(0).sqrt()
    raise ValueError(f"unknown mask score {kind!r}")


def fixed_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """The mask that a fixed saliency gives: the lowest ``sparsity`` share of each row, or the N lowest
    of every M inputs."""
    if n_m is not None:
        return n_of_m(scores, *n_m)
    return lowest_k_per_row(scores, sparsity)
