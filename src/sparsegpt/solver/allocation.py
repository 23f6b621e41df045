"""Non-uniform sparsity: OWL, outlier-weighted layerwise sparsity (Yin et al. 2023).

Blocks whose weights hold more outliers (Wanda saliency |W_ij|·‖X_j‖ above ``threshold`` × the mean of
their matrix) are pruned less. The outlier ratios D_b of the blocks are rescaled to [0, 2λ]; block b's
sparsity is the base minus (D_b − the mean rescaled ratio), the mean weighted by the number of weights,
so that the model's total number of zeros is what a uniform allocation prunes, exactly.
"""

from __future__ import annotations

import itertools
import math

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver.baselines import wanda_scores
from sparsegpt.solver.masks import pruned_count


def outlier_count(weight: torch.Tensor, column_norms: torch.Tensor, threshold: float) -> int:
    """How many weights (rows, cols) have a Wanda saliency above ``threshold`` × the matrix's mean."""
    saliency = wanda_scores(weight.to(torch.float32), column_norms)
    return int((saliency > threshold * saliency.mean()).sum())


def owl_counts(ratios: list[float], sizes: list[list[int]], base: list[list[float]], spread: float) -> list[list[int]]:
    """How many weights each matrix loses: ``ratios[b]`` is block b's outlier ratio, ``sizes[b][i]`` and
    ``base[b][i]`` the size and uniform sparsity of its i-th matrix; ``spread`` is λ.

    The counts add up to the uniform allocation's total, Σ pruned_count(base, size), exactly.
    """
    low, high = min(ratios), max(ratios)
    scaled = [(ratio - low) / (high - low) * 2 * spread if high > low else 0.0 for ratio in ratios]
    weights_per_block = [sum(block) for block in sizes]
    mean = sum(value * count for value, count in zip(scaled, weights_per_block)) / sum(weights_per_block)
    flat_sizes, wanted = [], []  # every matrix, block after block: its size and its real-valued count
    for block, (offset, block_sizes, block_base) in enumerate(zip(scaled, sizes, base)):
        for size, sparsity in zip(block_sizes, block_base):
            moved = sparsity - (offset - mean)
            if not 0 <= moved < 1:
                raise SparseGPTError(
                    f"OWL would give block {block} a sparsity of {moved:.3f}; lower the OWL lambda or the sparsity"
                )
            flat_sizes.append(size)
            wanted.append(moved * size)
    total = sum(pruned_count(sparsity, size) for block in zip(sizes, base) for size, sparsity in zip(*block))
    counts = [min(math.floor(real), size) for real, size in zip(wanted, flat_sizes)]
    # the largest remainders take the few weights that flooring left over (the smallest give some back)
    missing = total - sum(counts)
    step = 1 if missing > 0 else -1
    ranked = sorted(range(len(wanted)), key=lambda index: wanted[index] - math.floor(wanted[index]), reverse=True)
    if step < 0:
        ranked.reverse()
    for index in itertools.cycle(ranked):
        if not missing:
            break
        if 0 <= counts[index] + step <= flat_sizes[index]:
            counts[index] += step
            missing -= step
    flat = iter(counts)
    return [[next(flat) for _ in block_sizes] for block_sizes in sizes]
