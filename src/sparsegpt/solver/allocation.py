"""Non-uniform sparsity: OWL, outlier-weighted layerwise sparsity (Yin et al. 2023).

Blocks whose weights hold more outliers (Wanda saliency |W_ij|·‖X_j‖ above ``threshold`` × the mean of
their matrix) are pruned less. The outlier ratios D_b of the blocks are rescaled to [0, 2λ]; block b's
sparsity is the base minus (D_b − the mean rescaled ratio), the mean weighted by the number of weights,
so that the model's total number of zeros is what a uniform allocation prunes, exactly.
"""

from __future__ import annotations

import math

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver.masks import pruned_count


def outlier_count(weight: torch.Tensor, column_norms: torch.Tensor, threshold: float) -> int:
    """How many weights (rows, cols) have a Wanda saliency above ``threshold`` × the matrix's mean."""
    saliency = weight.abs().to(torch.float32) * column_norms.to(torch.float32).unsqueeze(0)
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
    wanted: list[tuple[int, int, float, int]] = []  # (block, matrix, real count, size)
    for block, (offset, block_sizes, block_base) in enumerate(zip(scaled, sizes, base)):
        for matrix, (size, sparsity) in enumerate(zip(block_sizes, block_base)):
            moved = sparsity - (offset - mean)
            if not 0 <= moved < 1:
                raise SparseGPTError(
                    f"OWL would give block {block} a sparsity of {moved:.3f}; lower the OWL lambda or the sparsity"
                )
            wanted.append((block, matrix, moved * size, size))
    total = sum(
        pruned_count(sparsity, size)
        for block_sizes, block_base in zip(sizes, base)
        for size, sparsity in zip(block_sizes, block_base)
    )
    counts = {(block, matrix): min(math.floor(real), size) for block, matrix, real, size in wanted}
    # the largest remainders take the few weights that flooring left over (or give them back)
    order = sorted(wanted, key=lambda item: item[2] - math.floor(item[2]), reverse=True)
    missing = total - sum(counts.values())
    step = 1 if missing > 0 else -1
    position = 0 if missing > 0 else len(order) - 1
    while missing:
        block, matrix, _, size = order[position % len(order)]
        if 0 <= counts[block, matrix] + step <= size:
            counts[block, matrix] += step
            missing -= step
        position += step
    return [[counts[block, matrix] for matrix in range(len(block_sizes))] for block, block_sizes in enumerate(sizes)]
