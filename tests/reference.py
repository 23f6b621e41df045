"""A slow, obviously-correct transcription of SparseGPT (Algorithm 1), for tests only.

No Cholesky trick and no lazy blocks: for every column j the inverse Hessian of the weights still free
(columns j and right of it) is computed explicitly, and each pruned weight's error is compensated with
the textbook OBS update δ = −(w_j / [H_F⁻¹]_jj) · [H_F⁻¹]_j,: on the row's remaining weights.
"""

from __future__ import annotations

import torch


def rounded(value: float) -> int:
    return int(value + 0.5)


def slow_sparsegpt(weight, hessian, sparsity, pattern=None, blocksize=128, damp=0.01):
    """Returns (pruned weight, mask) in float64. ``pattern`` is (n, m) or None."""
    weight = weight.double().clone()
    hessian = hessian.double().clone()
    rows, cols = weight.shape
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    hessian += damp * hessian.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    mask = torch.zeros(rows, cols, dtype=torch.bool)

    def free_inverse(j):  # inverse Hessian of the weights j..cols-1, the only ones still free
        return torch.linalg.inv(hessian[j:, j:])

    for j in range(cols):
        if pattern is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            saliency = torch.stack([weight[:, c] ** 2 / free_inverse(c)[0, 0] for c in range(j, end)], dim=1)
            count = rounded(sparsity * rows * end) - rounded(sparsity * rows * j)
            order = torch.argsort(saliency.flatten(), stable=True)[:count]
            block_mask = torch.zeros(saliency.numel(), dtype=torch.bool)
            block_mask[order] = True
            mask[:, j:end] = block_mask.view(rows, end - j)
        if pattern is not None and j % pattern[1] == 0:
            n, m = pattern
            saliency = torch.stack([weight[:, c] ** 2 / free_inverse(c)[0, 0] for c in range(j, j + m)], dim=1)
            for row in range(rows):
                for c in torch.argsort(saliency[row], stable=True)[:n]:
                    mask[row, j + c] = True
        inverse = free_inverse(j)
        for row in range(rows):
            if mask[row, j]:
                weight[row, j:] -= weight[row, j] / inverse[0, 0] * inverse[0, :]
                weight[row, j] = 0.0
    return weight, mask
