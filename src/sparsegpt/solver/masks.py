"""Mask selection with exact counts: True marks a weight to prune.

Every selector takes scores where lower means "cheaper to remove" and picks exactly the requested number
of entries (ties are broken by position, never by pruning more), so the achieved sparsity is the target.
"""

from __future__ import annotations

import math

import torch


def pruned_count(sparsity: float, total: int) -> int:
    """How many of ``total`` weights a ``sparsity`` share means: the nearest integer (halves round up)."""
    return int(sparsity * total + 0.5)


def split_count(sparsity: float, sizes: list[int]) -> list[int]:
    """Spread ``pruned_count(sparsity, sum(sizes))`` over consecutive parts of the given sizes.

    Each part gets its share of the running total, so the parts add up to exactly the whole's count and
    no part is off by more than one from ``sparsity * size``.
    """
    counts, done, seen = [], 0, 0
    for size in sizes:
        seen += size
        target = pruned_count(sparsity, seen)
        counts.append(target - done)
        done = target
    return counts


PAIRWISE_ENTRIES = 1 << 22
"""Up to this many (entry, group member) pairs, ``n_of_m`` ranks by comparing every pair; beyond, it sorts."""


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the ``k`` lowest entries of ``scores`` (any shape); among equal scores the first
    positions (row-major) go first, on every device (``topk`` breaks ties differently on CPU and CUDA,
    and quantized checkpoints have many equal weights)."""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    ties = flat == threshold
    mask = below | (ties & (ties.cumsum(0) <= k - below.sum()))
    return mask.view(scores.shape)


def lowest_k_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask pruning a ``sparsity`` share within each row of ``scores`` (rows, cols).

    Rows get ``split_count`` shares, so the matrix as a whole has exactly ``pruned_count`` entries; among
    equal scores the first columns go first, and a NaN counts as the largest score. Each row's k-th
    lowest score is found by selection, not by sorting the row (faster on the CPU).
    """
    rows, cols = scores.shape
    counts = torch.tensor(split_count(sparsity, [cols] * rows), device=scores.device)
    threshold = torch.full((rows,), -math.inf, dtype=scores.dtype, device=scores.device)
    for k in sorted(set(counts.tolist()) - {0}):  # rows' counts differ by at most one: one or two values
        kth = torch.topk(scores, k, dim=1, largest=False, sorted=False).values.amax(dim=1)  # (faster than kthvalue)
        threshold = torch.where(counts == k, kth, threshold)
    if threshold.dtype.is_floating_point and bool(threshold.isnan().any()):
        # a row whose pruned share reaches its NaN scores: comparisons cannot rank them, a sort does
        return lowest_k_per_row_sorted(scores, counts)
    below = scores < threshold.unsqueeze(1)
    ties = scores == threshold.unsqueeze(1)
    wanted = counts - below.count_nonzero(dim=1)  # how many of the ties at each threshold: the first ones
    if bool((ties.count_nonzero(dim=1) == wanted).all()):  # every tie pruned (scores mostly differ)
        return below | ties
    return below | (ties & (ties.cumsum(dim=1) <= wanted.unsqueeze(1)))


def lowest_k_per_row_sorted(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[r]`` lowest entries of each row r of ``scores`` by a stable sort of each row."""
    rows, cols = scores.shape
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
    return ranks < counts.unsqueeze(1)


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the ``n`` lowest of every ``m`` consecutive entries along each row of ``scores``."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into groups of {m}")
    return lowest_along(scores.reshape(rows, cols // m, m), n, dim=2).reshape(rows, cols)


def lowest_along(scores: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Mask of the ``n`` lowest entries of ``scores`` along ``dim``; equal scores go by position, on every
    device, and a NaN counts as the largest score."""
    ordered = scores.movedim(dim, 0)  # (m, ...)
    size = ordered.shape[0]
    if n <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if size <= 8 and scores.numel() * size <= PAIRWISE_ENTRIES:
        # each entry's rank from all m² comparisons at once (the solver asks once per group of columns,
        # and a stable sort of a few entries at a time costs several times more there)
        ordered = ordered.nan_to_num(nan=math.inf)
        first, second = ordered.unsqueeze(1), ordered.unsqueeze(0)  # entry i against entry j: [i, j, ...]
        earlier = torch.ones(size, size, dtype=torch.bool, device=scores.device).tril(-1)
        earlier = earlier.view(size, size, *([1] * (ordered.dim() - 1)))
        rank = ((first > second) | ((first == second) & earlier)).sum(dim=1, dtype=torch.uint8)
        return (rank < n).movedim(0, dim)
    mask = torch.zeros_like(ordered, dtype=torch.bool)
    mask.scatter_(0, ordered.argsort(dim=0, stable=True)[:n], True)
    return mask.movedim(0, dim)
