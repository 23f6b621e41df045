"""Beyond plain SparseGPT: weights refined on a fixed mask, mask repair, fixed mask scores, OWL allocation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pipeline import calibration

from sparsegpt import PruneConfig, prune_model
from sparsegpt.errors import SparseGPTError
from sparsegpt.models import find_blocks
from sparsegpt.report import overall_sparsity
from sparsegpt.solver import NMPattern, pruned_count, sparsegpt_prune
from sparsegpt.solver.allocation import outlier_count, owl_counts
from sparsegpt.solver.baselines import layer_loss
from sparsegpt.solver.refine import damped, mask_scores, refine_weights, repair_mask

from tiny import tiny_model


def layer(rows=12, cols=16, tokens=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tokens, cols, generator=generator, dtype=torch.float64)
    inputs[:, 3] *= 8  # an outlier feature
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64), 2 * inputs.T @ inputs / tokens


def best_on_support(original, hessian, pruned, damp):
    """Row by row, the exact minimizer of (x − w)ᵀ(H + λI)(x − w) with x zero where pruned."""
    system = damped(hessian, damp)
    best = torch.zeros_like(original)
    for row in range(original.shape[0]):
        kept = ~pruned[row]
        right = system[kept] @ original[row]
        best[row, kept] = torch.linalg.solve(system[kept][:, kept], right)
    return best


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_refine_reaches_the_least_squares_optimum_of_the_mask(pattern):
    original, hessian = layer()
    start = sparsegpt_prune(original, hessian, 0.5, pattern, blocksize=8)
    refined = refine_weights(start.weight, original, hessian, start.mask, iterations=200, damp=start.damp, tolerance=0)
    exact = best_on_support(original, hessian, start.mask, start.damp)
    assert torch.allclose(refined.weight, exact, atol=1e-6)
    assert bool((refined.weight[start.mask] == 0).all())
    assert refined.loss_after <= refined.loss_before
    assert refined.loss_after < 0.999 * refined.loss_before  # the sweep is not optimal for its own mask


def test_refine_stops_early_and_never_makes_a_layer_worse():
    original, hessian = layer(seed=3)
    start = sparsegpt_prune(original, hessian, 0.6, blocksize=4)
    few = refine_weights(start.weight, original, hessian, start.mask, iterations=500, damp=start.damp)
    assert few.iterations < 500  # converged: a step gained less than the tolerance
    optimal = best_on_support(original, hessian, start.mask, start.damp)
    best = layer_loss(optimal, original, hessian)
    assert abs(few.loss_after - best) < 1e-3 * best  # stopping early still lands next to the optimum
    again = refine_weights(optimal, original, hessian, start.mask, iterations=5, damp=start.damp)
    assert again.iterations <= 2 and torch.allclose(again.weight, optimal, atol=1e-9)  # nothing left to gain


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_repair_swaps_lower_the_loss_and_keep_the_counts(pattern):
    original, hessian = layer(rows=16, cols=32, seed=5)
    start = sparsegpt_prune(original, hessian, 0.5, pattern, blocksize=8)
    weight, mask, swaps = repair_mask(
        start.weight, original, hessian, start.mask, 10, pattern.m if pattern else None, start.damp
    )
    assert swaps > 0
    assert torch.equal(mask.sum(dim=1), start.mask.sum(dim=1))  # equal sparsity in every row
    if pattern is not None:
        assert bool((mask.view(16, -1, 4).sum(dim=2) == 2).all())
    assert bool((weight[mask] == 0).all())
    assert layer_loss(weight, original, hessian) < layer_loss(start.weight, original, hessian)


def test_repair_leaves_rows_with_nothing_to_swap_alone():
    original, hessian = layer(rows=2, cols=8)
    nothing_pruned = torch.zeros(2, 8, dtype=torch.bool)
    weight, mask, swaps = repair_mask(original, original, hessian, nothing_pruned, 3)
    assert swaps == 0 and torch.equal(mask, nothing_pruned) and torch.equal(weight, original)


def test_mask_scores_follow_their_papers():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([4.0, 9.0])
    assert torch.equal(mask_scores("wanda", weight, norms), torch.tensor([[4.0, 18.0], [12.0, 4.5]]))
    ria = mask_scores("ria", weight, norms)
    expected = (1.0 / 3 + 1.0 / 4) * 2  # |w| / row sum + |w| / column sum, times sqrt(4)
    assert ria[0, 0].item() == pytest.approx(expected)


def test_a_given_mask_is_kept_and_compensated_like_the_one_sparsegpt_chooses():
    original, hessian = layer(rows=8, cols=16, seed=2)
    chosen = sparsegpt_prune(original, hessian, 0.5, blocksize=4)
    given_mask = sparsegpt_prune(original, hessian, 0.5, blocksize=4, mask=chosen.mask)
    assert torch.equal(given_mask.mask, chosen.mask)
    assert torch.allclose(given_mask.weight, chosen.weight, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 0.2), min_size=2, max_size=6),
    size=st.integers(10, 300),
    sparsity=st.floats(0.31, 0.69),  # block offsets reach ±2λ: every block stays between 0 and 1
    spread=st.floats(0, 0.15),
)
def test_owl_counts_keep_the_total_exact(ratios, size, sparsity, spread):
    sizes = [[size, 2 * size + 1] for _ in ratios]
    base = [[sparsity, sparsity] for _ in ratios]
    counts = owl_counts(ratios, sizes, base, spread)
    uniform = sum(pruned_count(sparsity, n) for block in sizes for n in block)
    assert sum(sum(block) for block in counts) == uniform
    per_block = [sum(block) / sum(block_sizes) for block, block_sizes in zip(counts, sizes)]
    most, least = ratios.index(max(ratios)), ratios.index(min(ratios))
    assert per_block[most] <= per_block[least] + 2 / size  # more outliers, fewer zeros


def test_owl_refuses_an_impossible_spread():
    with pytest.raises(SparseGPTError, match="OWL would give block"):
        owl_counts([0.0, 1.0], [[100], [100]], [[0.95], [0.95]], 0.2)


def test_outlier_count():
    weight = torch.ones(4, 4)
    weight[0, 0] = 100.0
    assert outlier_count(weight, torch.ones(4), 5.0) == 1


def test_pipeline_with_every_option_keeps_the_total_and_lowers_errors():
    plain_model, model = tiny_model("llama"), tiny_model("llama")
    plain = prune_model(plain_model, PruneConfig(sparsity=0.6), calibration())
    config = PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.1, repair=4, refine=30)
    records = prune_model(model, config, calibration())
    assert overall_sparsity(records) == pytest.approx(overall_sparsity(plain), abs=1e-12)
    total = sum(weight.matrix().numel() for block in find_blocks(model) for weight in block.weights)
    zeros = sum(int((weight.matrix() == 0).sum()) for block in find_blocks(model) for weight in block.weights)
    assert zeros == sum(
        pruned_count(0.6, weight.matrix().numel()) for block in find_blocks(model) for weight in block.weights
    )
    assert 0 < zeros < total
    per_block = {record.name.split(".layers.")[1].split(".")[0]: record.sparsity for record in records}
    assert len(set(round(value, 6) for value in per_block.values())) > 1  # not uniform any more
    assert all(record.refine_iterations is not None and record.swaps is not None for record in records)


def test_refine_alone_never_raises_a_layer_error():
    plain_model, model = tiny_model("opt"), tiny_model("opt")
    plain = prune_model(plain_model, PruneConfig(mask_score="ria"), calibration())
    records = prune_model(model, PruneConfig(refine=25, mask_score="ria"), calibration())
    assert all(record.error is not None and record.refine_iterations for record in records)
    # the first block's layers see the same inputs in both runs (later blocks see different predecessors)
    first = [(before, after) for before, after in zip(plain, records) if ".layers.0." in after.name]
    assert first and all(after.error <= before.error + 1e-12 for before, after in first)
    assert any(after.error < 0.99 * before.error for before, after in first)


@pytest.mark.parametrize(
    "settings_, message",
    [
        (dict(method="wanda", refine=3), "needs method sparsegpt"),
        (dict(bits=4, refine=3), "off the quantization grid"),
        (dict(pattern=NMPattern(2, 4), allocation="owl"), "N:M pattern"),
        (dict(method="magnitude", allocation="owl"), "magnitude uses no calibration"),
        (dict(allocation="spread"), "unknown allocation"),
        (dict(mask_score="random"), "unknown mask score"),
        (dict(repair=-1), "non-negative"),
    ],
)
def test_bad_combinations_are_refused(settings_, message):
    with pytest.raises(SparseGPTError, match=message):
        PruneConfig(**settings_)


def test_streaming_refuses_owl_but_streams_the_per_layer_options(tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsegpt.streaming import driver as streamed

    from tiny import llama_folder

    llama_folder(tmp_path, layers=2)
    windows = calibration()
    with pytest.raises(SparseGPTError, match="not available with --stream"):
        streamed.prune_streamed(tmp_path / "model", tmp_path / "out", PruneConfig(allocation="owl"), windows)
    config = PruneConfig(refine=10, repair=2, mask_score="ria")
    run = streamed.prune_streamed(tmp_path / "model", tmp_path / "out", config, windows)
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    prune_model(in_memory, config, windows)
    streamed_model = AutoModelForCausalLM.from_pretrained(run.out)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, streamed_model.state_dict()[name]), name
