"""A slow, obviously-correct transcription of SparseGPT (Algorithm 1), for tests only.

No Cholesky trick and no lazy blocks: for every column j the inverse Hessian of the weights still free
(columns j and right of it) is computed explicitly, and each pruned weight's error is compensated with
the textbook OBS update δ = −(w_j / [H_F⁻¹]_jj) · [H_F⁻¹]_j,: on the row's remaining weights. With
``quant`` each kept weight is first replaced by its nearest grid point (row by row, group by group, the grid
fitted on the group's current weights) and the difference is compensated the same way.
"""

from __future__ import annotations

import torch

from sparsegpt.solver import InputStatistics


def rounded(value: float) -> int:
    return int(value + 0.5)


def slow_grid(values, bits, symmetric):
    """(scale, zero) for one row's group of weights (a list of floats)."""
    top = 2**bits - 1
    if symmetric:
        scale = 2 * max(abs(v) for v in values) / top
    else:
        low, high = min(min(values), 0.0), max(max(values), 0.0)
        scale = (high - low) / top
    scale = float(torch.tensor(scale).half()) or 1.0  # scales are float16 numbers; all-zero groups get 1
    zero = 2 ** (bits - 1) if symmetric else min(max(round(-low / scale), 0), top)
    return scale, zero


def slow_round(value, scale, zero, bits):
    code = min(max(round(value / scale) + zero, 0), 2**bits - 1)
    return (code - zero) * scale


def slow_sparsegpt(weight, hessian, sparsity, pattern=None, blocksize=128, damp=0.01, quant=None):
    """Returns (pruned weight, mask) in float64. ``pattern`` is (n, m) or None; ``quant`` is
    (bits, group size or None, symmetric) or None."""
    weight = weight.double().clone()
    hessian = hessian.double().clone()
    rows, cols = weight.shape
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    hessian += damp * hessian.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    grids = {}

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
        if quant is not None:
            bits, group, symmetric = quant
            group = group or cols
            if j % group == 0:
                for row in range(rows):
                    grids[row] = slow_grid(weight[row, j : j + group].tolist(), bits, symmetric)
        inverse = free_inverse(j)
        for row in range(rows):
            target = 0.0 if mask[row, j] else float(weight[row, j])
            if quant is not None and not mask[row, j]:
                target = slow_round(target, *grids[row], quant[0])
            weight[row, j:] -= (weight[row, j] - target) / inverse[0, 0] * inverse[0, :]
            weight[row, j] = target
    return weight, mask


def problem(rows, cols, tokens=256, seed=0, dead=()):
    """A weight and the Hessian of correlated inputs, in float64."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator, dtype=torch.float64) / cols**0.5
    inputs = torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ (torch.eye(cols) + mixing)
    inputs[:, list(dead)] = 0.0
    stats = InputStatistics(cols, dtype=torch.float64)
    stats.add(inputs)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return weight, stats.hessian(), inputs
