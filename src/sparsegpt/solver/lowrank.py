"""Sparse + low-rank: W ≈ S + BA, the factors fitted to keep the layer's outputs, without backpropagation.

Once a layer's sparse weight S is fixed, the rank-r term that best restores its outputs on the
calibration inputs minimises tr((R − BA) H (R − BA)ᵀ) with R = W − S and H ∝ XᵀX. With H = LLᵀ (the
damped Hessian's Cholesky factor) this is ‖(R − BA)L‖²_F, whose minimum over rank-r matrices is the
truncated SVD of the whitened residual RL (Eckart–Young), mapped back by L⁻¹: the closed form of EoRA
(Liu et al. 2024), there written with an eigendecomposition of H; any factor of H gives the same
product BA.

``alternate_low_rank`` then alternates, as HASSLE-free (Makni et al. 2025) does: re-solve S for the
target W − BA, on its mask (``refine.refine_weights``) or after pruning W − BA afresh, which lets the mask
follow the residual the factors leave, and re-fit BA to W − S. A round that would raise the layer's loss
is not kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver.baselines import layer_loss
from sparsegpt.solver.refine import damped, refine_weights
from sparsegpt.solver.sparsegpt import DAMPING_STEPS

log = logging.getLogger(__name__)


@dataclass
class LowRankFit:
    """Factors of the rank-r term BA: ``b`` (rows, r) and ``a`` (r, cols), the sparse weight they complete
    (rows, cols) and its mask ``pruned`` (True = zero)."""

    b: torch.Tensor
    a: torch.Tensor
    sparse: torch.Tensor
    pruned: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def product(self) -> torch.Tensor:
        """BA, shape (rows, cols)."""
        return self.b @ self.a


def rank_for_budget(rows: int, cols: int, budget: float) -> int:
    """The largest rank whose factors, r·(rows + cols) values, take at most ``budget`` of rows·cols."""
    return int(budget * rows * cols // (rows + cols))


def fit_low_rank(
    residual: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors B (rows, r) and A (r, cols), r ≤ ``rank``, that minimise tr((R − BA) H (R − BA)ᵀ) for
    R = ``residual`` (rows, cols) and H = ``hessian`` (cols, cols).

    The minimum is taken for the damped H (``refine.damped``, as the sweep factorizes it, the damping
    raised where the factorization fails); BA is then
    scaled by the one factor that minimises the undamped loss, so the result never loses more than
    BA = 0. B and A share the singular values' square roots, which keeps both in a narrow range (they
    may be stored in half precision).
    """
    rank = min(rank, *residual.shape)
    if rank <= 0:
        return residual.new_zeros(residual.shape[0], 0), residual.new_zeros(0, residual.shape[1])
    hessian = hessian.to(residual.dtype)
    lower = _damped_cholesky(hessian, damp)
    left, singular, right = torch.linalg.svd(residual @ lower, full_matrices=False)
    root = singular[:rank].sqrt()
    b = left[:, :rank] * root
    # A = Σ½ Vᵀ L⁻¹: solve A L = Σ½ Vᵀ
    a = torch.linalg.solve_triangular(lower, root.unsqueeze(1) * right[:rank], upper=False, left=False)
    scale = _best_scale(residual, b @ a, hessian)
    return b * scale, a


def _damped_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """L with H + λI = LLᵀ (``refine.damped``); the relative damping is raised tenfold, at most
    ``DAMPING_STEPS`` times, while the factorization fails, as the sweep's is."""
    for step in range(DAMPING_STEPS + 1):
        lower, info = torch.linalg.cholesky_ex(damped(hessian, damp))
        if int(info) == 0:
            return lower
        if step < DAMPING_STEPS:
            raised = max(damp * 10, 1e-6)
            log.warning(
                "Cholesky factorization for the low-rank fit failed with damping %.3g; retrying with %.3g", damp, raised
            )
            damp = raised
    raise SparseGPTError(
        f"Hessian is not positive definite even with relative damping {damp:.3g}: cannot fit the low-rank term"
    )


def _best_scale(residual: torch.Tensor, product: torch.Tensor, hessian: torch.Tensor) -> float:
    """argmin over α of tr((R − αP) H (R − αP)ᵀ) = ⟨R, P⟩_H / ⟨P, P⟩_H (0 when P is 0 on H)."""
    weighted = (product @ hessian).to(torch.float64)
    energy = float((weighted * product).sum())
    return float((weighted * residual).sum()) / energy if energy > 0 else 0.0


Prune = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""target (rows, cols) → its pruned weight and mask (True = zero), at the layer's sparsity and pattern."""


def alternate_low_rank(
    original: torch.Tensor,
    sparse: torch.Tensor,
    pruned: torch.Tensor,
    hessian: torch.Tensor,
    rank: int,
    rounds: int = 0,
    damp: float = 0.01,
    refine_iterations: int = 100,
    prune: Prune | None = None,
) -> LowRankFit:
    """Fit BA to W − S, then ``rounds`` times re-solve S for W − BA and re-fit BA.

    ``original`` W and ``sparse`` S are (rows, cols), ``pruned`` S's mask (True = zero), ``hessian`` H
    (cols, cols). A round re-solves S's kept weights on the mask for W − BA (``refine_iterations`` of the
    refine solver); with ``prune`` it first prunes W − BA afresh, so that the mask may change, and
    refines on the new mask. A round that does not lower the layer's loss ‖(W − S − BA)X‖² ends the
    alternation and is not kept.
    """
    b, a = fit_low_rank(original - sparse, hessian, rank, damp)
    best = LowRankFit(b, a, sparse, pruned)
    loss = layer_loss(sparse + best.product(), original, hessian)
    for _ in range(rounds):
        target = original - best.product()
        start, mask = prune(target) if prune is not None else (best.sparse, best.pruned)
        resolved = refine_weights(start, target, hessian, mask, refine_iterations, damp).weight
        b, a = fit_low_rank(original - resolved, hessian, rank, damp)
        candidate = LowRankFit(b, a, resolved, mask)
        candidate_loss = layer_loss(resolved + candidate.product(), original, hessian)
        if not candidate_loss < loss:
            break
        best, loss = candidate, candidate_loss
    return best
