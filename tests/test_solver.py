"""The solver against the slow transcription, exact counts and patterns, and its error against baselines."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver import (
    InputStatistics,
    NMPattern,
    gram,
    inverse_factor,
    inverse_hessian_cholesky,
    lowest_k,
    lowest_k_per_row,
    magnitude_prune,
    masks,
    n_of_m,
    pruned_count,
    relative_output_error,
    sparsegpt_prune,
    split_count,
    wanda_prune,
)
from sparsegpt.solver.sparsegpt import (
    FACTORIZATIONS,
    lower_triangular_inverse,
    prepare_hessian,
    reverse_in_place,
    transpose_in_place,
    triangular_product,
)

from reference import problem, slow_sparsegpt


@pytest.mark.parametrize(
    "rows, cols, sparsity, pattern, blocksize, dead",
    [
        (12, 64, 0.5, None, 16, ()),
        (7, 40, 0.3, None, 16, ()),  # ragged last block, odd row count
        (8, 48, 0.75, None, 128, (3, 17)),  # one block, dead inputs
        (10, 32, 0.5, (2, 4), 16, ()),
        (6, 48, 0.5, (4, 8), 16, (5,)),
        (5, 36, 0.25, (1, 4), 12, ()),
        (9, 96, 0.5, (2, 4), 64, (40,)),  # sub-blocks of 16 inside blocks of 64
        (6, 100, 0.6, None, 48, ()),  # sub-blocks of 16 and a ragged last one
    ],
)
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_fast_solver_equals_slow_transcription(rows, cols, sparsity, pattern, blocksize, dead, factorization):
    weight, hessian, _ = problem(rows, cols, dead=dead)
    nm = NMPattern(*pattern) if pattern else None
    result = sparsegpt_prune(weight, hessian, sparsity, nm, blocksize, 0.01, factorization=factorization)
    expected_weight, expected_mask = slow_sparsegpt(weight, hessian, sparsity, pattern, blocksize, 0.01)
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight, expected_weight, rtol=1e-9, atol=1e-9)
    assert result.dead_inputs == len(dead)


def test_hessian_is_twice_the_mean_outer_product_and_skips_padding():
    inputs = torch.randn(3, 5, 4, dtype=torch.float64)
    keep = torch.rand(3, 5) > 0.3
    stats = InputStatistics(4, dtype=torch.float64)
    stats.add(inputs[:2], keep[:2])
    stats.add(inputs[2:], keep[2:])
    rows = inputs[keep]
    torch.testing.assert_close(stats.hessian(), 2 * rows.T @ rows / rows.shape[0])
    assert stats.tokens == int(keep.sum())
    torch.testing.assert_close(stats.column_norms(), rows.norm(dim=0))


def test_norms_only_statistics_match_the_gram_diagonal():
    inputs = torch.randn(3, 5, 4, dtype=torch.float64)
    full, norms = InputStatistics(4, dtype=torch.float64), InputStatistics(4, dtype=torch.float64, full=False)
    for batch in inputs:
        full.add(batch)
        norms.add(batch)
    torch.testing.assert_close(norms.column_norms(), full.column_norms())
    assert norms.gram is None and norms.tokens == full.tokens == 15
    with pytest.raises(ValueError, match="only column norms"):
        norms.hessian()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("tokens", "width"), [(1, 1), (37, 5), (512, 96), (300, 130), (64, 600)])
def test_gram_sums_exact_products_on_the_upper_block_triangle(dtype, native, tokens, width, monkeypatch):
    if not native:  # without MKL's routines: every precision by blocks of torch products
        monkeypatch.setattr(gram, "_routine", lambda _: None)
        monkeypatch.setattr(gram, "_syrk", lambda _: None)
    rows = torch.randn(tokens, width).to(dtype)
    edges = [0, width // 3, width] if width > 128 else [0, width]
    result = torch.zeros(width, width, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    gram.add_gram(result, rows, edges)
    gram.add_gram(result, rows[: tokens // 2], edges)
    widened = rows.to(torch.float64)  # 16-bit products are exact in float32; only the sums round
    expected = widened.T @ widened + widened[: tokens // 2].T @ widened[: tokens // 2]
    for start, end in zip(edges, edges[1:]):  # below the diagonal blocks: untouched until mirrored
        assert not result[end:, start:end].any()
    whole = gram.mirror_gram(result, edges)
    assert torch.equal(whole, whole.T)  # mirrored, not summed twice
    torch.testing.assert_close(whole.double(), expected, rtol=1e-5, atol=1e-5 * tokens)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="a torch build without MKL")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_update_fills_the_upper_triangle_of_strided_views(dtype):
    update = gram._syrk(dtype)
    rows = torch.randn(70, 40, dtype=dtype)
    out = torch.ones(30, 50, dtype=dtype)
    window = out[5:25, 10:30]  # a view with a row stride of 50
    update(window, rows[:, 3:23])  # a sliced operand: rows of stride 40
    product = rows[:, 3:23].T @ rows[:, 3:23]
    expected = torch.ones(30, 50, dtype=dtype)
    expected[5:25, 10:30] += product.triu()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_a_rank_update_that_misbehaves_is_not_used():
    def full_product(out, rows):  # also writes below the diagonal
        out += rows.T @ rows

    def lower_half(out, rows):
        out += (rows.T @ rows).tril()

    def triangle(out, rows):
        out += (rows.T @ rows).triu()

    assert gram.rank_update_agrees(triangle, torch.float32)
    assert not gram.rank_update_agrees(full_product, torch.float32)
    assert not gram.rank_update_agrees(lower_half, torch.float32)


@pytest.mark.parametrize("width", [1, 100, 191, 192, 300, 576, 1536, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triangle_edges_split_the_width_into_near_equal_blocks(width, dtype):
    edges = gram.triangle_edges(width, dtype)
    sizes = [end - start for start, end in zip(edges, edges[1:])]
    assert edges[0] == 0 and edges[-1] == width and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    target = gram.TRIANGLE_BLOCKS.get(dtype, 256)
    assert len(sizes) == max(1, round(width / target))


@pytest.mark.parametrize("native", [True, False])
def test_products_take_strided_views_and_other_precisions(native, monkeypatch):
    if not native:
        monkeypatch.setattr(gram, "_routine", lambda _: None)
    rows = torch.randn(64, 40).to(torch.bfloat16)
    out = torch.ones(30, 50)
    block = out[5:25, 10:30]  # a view with a row stride of 50
    gram.add_product(block, rows[:, ::2], rows[:, 3:23])  # a strided and a sliced operand
    expected = torch.ones(30, 50)
    expected[5:25, 10:30] += rows[:, ::2].float().T @ rows[:, 3:23].float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    exact = torch.randn(30, 6, dtype=torch.float64)
    result64 = torch.zeros(6, 6, dtype=torch.float64)
    gram.add_product(result64, exact, exact)
    torch.testing.assert_close(result64, exact.T @ exact, rtol=1e-12, atol=1e-12)


def test_torch_builds_with_mkl_give_the_native_mixed_precision_product():
    # without it bf16 Hessians still come out right (widened to float32), only several times slower
    if torch.backends.mkl.is_available():
        assert gram.native_mixed_gram(torch.bfloat16) and gram.native_mixed_gram(torch.float16)
        assert gram._syrk(torch.float32) is not None and gram._syrk(torch.float64) is not None
    assert not gram.native_mixed_gram(torch.float32)


needs_native = pytest.mark.skipif(not gram.native_available(torch.bfloat16), reason="no AVX512-BF16 here")


def exact_sums(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """leftᵀ·right in float64 and the sums of the products' magnitudes (the scale of float32 rounding)."""
    return left.double().T @ right.double(), left.double().abs().T @ right.double().abs()


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, width", [(1, 1), (3, 5), (17, 47), (600, 49), (513, 96), (1025, 577)])
def test_native_gram_sums_exactly_the_upper_triangle(tokens, width, dtype):
    # odd token counts (a pair with a zero), widths off the 48-column panels and 8-row tiles, 2+ chunks
    rows = torch.randn(tokens + 3, width + 2).to(dtype)[3:, 1:-1]  # a sliced operand, row stride width + 2
    out = torch.full((width + 4, width + 6), 0.5)
    view = out[2 : 2 + width, 3 : 3 + width]  # a view with a row stride of width + 6
    gram.add_gram(view, rows, backend="native")
    product, scale = exact_sums(rows, rows)
    upper = torch.ones(width, width, dtype=torch.bool).triu()
    error = (view.double() - 0.5 - product).abs()
    assert (error[upper] <= 2.0**-22 * scale[upper] * (tokens + 1)).all()  # float32 sums of exact products
    outside = torch.ones_like(out, dtype=torch.bool)
    outside[2 : 2 + width, 3 : 3 + width] = ~upper
    assert (out[outside] == 0.5).all()  # below the diagonal and around the view: untouched


@needs_native
@pytest.mark.parametrize("tokens, k, n", [(1, 1, 1), (5, 3, 7), (9, 64, 49), (100, 577, 97), (20, 1100, 50)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_native_linear_matches_the_exact_product(tokens, k, n, accumulate):
    inputs = torch.randn(tokens, k + 1).bfloat16()[:, 1:]  # row stride k + 1
    weight = gram.mixed_weight(torch.randn(n, k).bfloat16(), "native")
    assert weight.packed is not None and gram.mixed_weight(weight.matrix).packed is None  # "mkl": unpacked
    out = torch.full((tokens, n + 2), 0.25)
    gram.mixed_linear(out[:, 1:-1], inputs, weight, accumulate=accumulate)
    product, scale = exact_sums(inputs.T, weight.matrix.T)
    error = (out[:, 1:-1].double() - 0.25 * accumulate - product).abs()
    assert (error <= 2.0**-22 * (scale + 1) * (k + 1)).all()
    assert (out[:, 0] == 0.25).all() and (out[:, -1] == 0.25).all()


@needs_native
@pytest.mark.parametrize("operands", [torch.bfloat16, None])
def test_statistics_agree_whichever_backend_sums_them(operands):
    inputs = torch.randn(2, 300, 200)
    results = []
    for backend in gram.BACKENDS:
        stats = InputStatistics(200, operands=operands, backend=backend)
        for batch in inputs:
            stats.add(batch)
        results.append(stats.hessian())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[1], results[1].T)


def test_native_kernels_say_what_they_take():
    assert not gram.native_available(torch.float16) and "native" not in gram.mixed_backends(torch.float16)
    if gram.native_available(torch.bfloat16):
        assert gram.native_available(torch.float32) and "native" in gram.mixed_backends(torch.bfloat16)


takes_squares = pytest.mark.skipif(
    not gram.native_column_squares(torch.zeros(1), torch.zeros(1, 1)), reason="no AVX-512 (F, BW, VL) here"
)


@takes_squares
@pytest.mark.parametrize("width", [7, 64, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_squares_are_the_chunked_torch_sums(width, dtype):
    generator = torch.Generator().manual_seed(width)
    wide = torch.randn(600, width + 5, generator=generator).to(dtype)
    rows = wide[:, 3 : 3 + width]  # rows at a stride wider than the width
    start = torch.rand(width, generator=generator)
    squares = start.clone()
    assert gram.native_column_squares(squares, rows)
    expected = start.clone()
    for chunk in rows.split(256):  # what InputStatistics sums by torch elsewhere
        expected.add_(chunk.float().square().sum(dim=0))
    assert torch.allclose(squares, expected, rtol=1e-6, atol=0)


def test_column_squares_leave_to_torch_what_the_kernel_does_not_take():
    rows = torch.randn(10, 4)
    assert not gram.native_column_squares(torch.zeros(4, dtype=torch.float64), rows)  # float64 sums
    assert not gram.native_column_squares(torch.zeros(4), rows.t().contiguous().t())  # columns not contiguous
    assert not gram.native_column_squares(torch.zeros(4), rows.half())


@pytest.mark.parametrize("width", [24, 600])  # 600: the Gram matrix is summed in two blocks of rows
def test_statistics_with_16_bit_operands_see_the_rounded_inputs(width):
    inputs = torch.randn(3, 300, width)  # 300 rows a batch: the column squares are summed in two chunks
    stats = InputStatistics(width, operands=torch.bfloat16)
    norms = InputStatistics(width, operands=torch.bfloat16, full=False)
    for batch in inputs:
        stats.add(batch)
        norms.add(batch)
    rounded = inputs.reshape(-1, width).to(torch.bfloat16).double()
    expected = 2 * rounded.T @ rounded / 900
    torch.testing.assert_close(stats.hessian().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.take_hessian().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.column_norms().double(), rounded.norm(dim=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("cols", [24, 600])  # 600: the triangular inverse recurses (blocks of 256)
def test_inverse_cholesky_factor_gives_the_damped_inverse(factorization, cols):
    _, hessian, _ = problem(4, cols)
    upper, damp = inverse_hessian_cholesky(hessian, 0.01, factorization)
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all()) and damp == 0.01
    # the upper factor with a positive diagonal is unique: both ways give the same U
    other = inverse_hessian_cholesky(hessian, 0.01, "inverse" if factorization == "reversed" else "reversed")[0]
    torch.testing.assert_close(upper, other)
    assert torch.equal(hessian, problem(4, cols)[1])  # the Hessian itself is left as it was


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_dead_inputs_factorize_as_a_prepared_hessian(factorization):
    _, hessian, _ = problem(6, 40, dead=[0, 17])
    dead = hessian.diagonal() == 0
    prepared, _ = prepare_hessian(hessian)
    upper, _ = inverse_hessian_cholesky(hessian, 0.01, factorization, dead)
    assert torch.equal(upper, inverse_hessian_cholesky(prepared, 0.01, factorization)[0])


@pytest.mark.parametrize("size", [1, 2, 7, 8, 513])
def test_reverse_and_transpose_in_place(size):
    matrix = torch.randn(size, size, generator=torch.Generator().manual_seed(size))
    expected = matrix.flip(0, 1)
    reverse_in_place(matrix, rows=3)
    assert torch.equal(matrix, expected)
    transpose_in_place(matrix, tile=3)
    assert torch.equal(matrix, expected.T)


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_a_shared_inverse_factor_solves_exactly_like_the_hessian(pattern):
    weight, hessian, _ = problem(12, 40, dead=[3])
    factor = inverse_factor(hessian, 0.01, dtype=torch.float64)
    assert factor.dead.sum() == 1
    for rows in (weight, weight[:5].flip(1)):  # two layers reading the same inputs
        direct = sparsegpt_prune(rows, hessian, 0.5, pattern, 16, 0.01)
        shared = sparsegpt_prune(rows, factor, 0.5, pattern, 16)
        assert torch.equal(direct.mask, shared.mask) and torch.equal(direct.weight, shared.weight)
        assert (direct.damp, direct.dead_inputs) == (shared.damp, shared.dead_inputs)


# 1100: halves of 550 rows, so the off-diagonal products split too (through transposed views)
@pytest.mark.parametrize(
    ("size", "leaf"), [(1, 256), (7, 256), (256, 256), (257, 256), (700, 256), (700, 16), (1100, 256)]
)
def test_lower_triangular_inverse_by_halves(size, leaf):
    lower = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size)).tril()
    lower.diagonal().copy_(lower.diagonal().abs() + size**0.5)  # well conditioned
    inverse = lower_triangular_inverse(lower, leaf)
    torch.testing.assert_close(inverse, torch.linalg.inv(lower))
    assert torch.equal(inverse, inverse.tril())


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(("size", "leaf"), [(1, 1), (9, 2), (64, 8), (257, 16)])
def test_triangular_product_multiplies_only_the_triangle(size, leaf, lower):
    generator = torch.Generator().manual_seed(size)
    full = torch.randn(size, size, dtype=torch.float64, generator=generator)
    triangle = full.tril() if lower else full.triu()
    dense = torch.randn(size, 5, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(triangular_product(triangle, dense, lower, leaf), triangle @ dense)
    # the other triangle is never read outside the leaves
    littered = triangle + (full.triu(leaf) if lower else full.tril(-leaf))
    torch.testing.assert_close(triangular_product(littered, dense, lower, leaf), triangle @ dense)


def test_unknown_factorization_is_refused():
    with pytest.raises(SparseGPTError, match="factorization must be one of reversed, inverse"):
        inverse_hessian_cholesky(torch.eye(3), 0.01, "qr")


def test_failed_factorization_raises_damping_and_records_it(caplog):
    hessian = -torch.eye(6, dtype=torch.float64)  # negative definite: fails until damping dominates
    hessian[0, 0] = 30.0
    upper, damp = inverse_hessian_cholesky(hessian, 0.01)
    assert damp > 0.01 and torch.isfinite(upper).all()
    assert "retrying" in caplog.text


def test_hopeless_hessian_raises_instead_of_falling_back():
    with pytest.raises(SparseGPTError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(4), 0.01)
    with pytest.raises(SparseGPTError, match="NaN or Inf"):
        inverse_hessian_cholesky(torch.full((3, 3), float("nan")), 0.01)


def test_ties_go_by_position_so_every_device_picks_the_same_mask():
    scores = torch.tensor([[3.0, 1.0, 1.0, 2.0], [1.0, 1.0, 0.5, 1.0]])
    assert lowest_k(scores, 4).tolist() == [[False, True, True, False], [True, False, True, False]]
    assert n_of_m(scores, 2, 4).tolist() == [[False, True, True, False], [True, False, True, False]]
    assert lowest_k(scores, 0).sum() == 0 and lowest_k(scores, 8).all()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (7, 8), (0, 4)]),
    levels=st.integers(1, 5),  # few distinct scores: many ties
    nan=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_n_of_m_by_ranks_equals_the_stable_sort(rows, nm, levels, nan, seed):
    n, m = nm
    scores = torch.randint(0, levels, (rows, 3 * m), generator=torch.Generator().manual_seed(seed)).float()
    if nan:
        scores[0, 0] = float("nan")  # the largest score, both ways
    ranked = n_of_m(scores, n, m)
    original = masks.PAIRWISE_ENTRIES
    try:
        masks.PAIRWISE_ENTRIES = 0  # forces the stable sort
        sorted_mask = n_of_m(scores, n, m)
    finally:
        masks.PAIRWISE_ENTRIES = original
    assert torch.equal(ranked, sorted_mask)
    assert bool((ranked.view(rows, 3, m).sum(dim=2) == n).all())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    sparsity=st.floats(0, 1),
    values=st.sampled_from(["distinct", "ties", "nan", "bf16"]),
    seed=st.integers(0, 10_000),
)
def test_per_row_selection_is_the_stable_sort(rows, cols, sparsity, values, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=generator)
    if values == "ties":
        scores = torch.randint(0, 3, (rows, cols), generator=generator).float()
    if values == "nan":  # a NaN ranks above everything, +inf included
        scores[torch.rand(rows, cols, generator=generator) < 0.3] = float("nan")
        scores[torch.rand(rows, cols, generator=generator) < 0.2] = float("inf")
    if values == "bf16":
        scores = scores.bfloat16().round()
    counts = torch.tensor(split_count(sparsity, [cols] * rows))
    mask = lowest_k_per_row(scores, sparsity)
    assert torch.equal(mask, masks.lowest_k_per_row_sorted(scores, counts))
    assert torch.equal(mask.sum(dim=1), counts)


def test_ties_never_over_prune():
    scores = torch.zeros(4, 8)  # every score tied
    assert int(lowest_k(scores, 13).sum()) == 13
    assert int(lowest_k_per_row(scores, 0.5).sum()) == 16
    weight = torch.ones(4, 8)  # all saliencies tied in the solver too
    result = sparsegpt_prune(weight, torch.eye(8) * 2, 0.5, blocksize=4)
    assert int(result.mask.sum()) == 16 and int((result.weight == 0).sum()) == 16


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    sparsity=st.floats(0, 0.99),
    blocksize=st.integers(1, 24),
    seed=st.integers(0, 10_000),
)
def test_unstructured_sparsity_is_exact(rows, cols, sparsity, blocksize, seed):
    weight, hessian, _ = problem(rows, cols, tokens=64, seed=seed)
    result = sparsegpt_prune(weight.float(), hessian.float(), sparsity, blocksize=blocksize)
    expected = pruned_count(sparsity, rows * cols)
    assert int(result.mask.sum()) == expected
    assert int((result.weight == 0).sum()) == expected
    assert not result.weight[result.mask].any()
    assert sum(split_count(sparsity, [cols] * rows)) == expected
    assert int(lowest_k_per_row(weight, sparsity).sum()) == expected


@settings(max_examples=40, deadline=None)
@given(
    n_m=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 8)]),
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(["sparsegpt", "wanda", "magnitude"]),
)
def test_n_of_m_groups_are_valid(n_m, rows, groups, seed, method):
    n, m = n_m
    cols = m * groups
    weight, hessian, inputs = problem(rows, cols, tokens=64, seed=seed)
    pattern = NMPattern(n, m)
    if method == "sparsegpt":
        result = sparsegpt_prune(weight, hessian, 0.0, pattern, blocksize=m * 2)
    elif method == "wanda":
        result = wanda_prune(weight, inputs.norm(dim=0), 0.0, pattern)
    else:
        result = magnitude_prune(weight, 0.0, pattern)
    per_group = result.mask.view(rows, groups, m).sum(dim=2)
    assert torch.all(per_group == n)
    assert not result.weight[result.mask].any()
    assert torch.equal(n_of_m(weight.abs(), n, m).view(rows, groups, m).sum(dim=2), per_group)


def test_pattern_parsing_and_validation():
    assert NMPattern.parse("2:4") == NMPattern(2, 4)
    for bad in ("4:4", "5:4", "0:4", "2-4", "a:b"):
        with pytest.raises(SparseGPTError):
            NMPattern.parse(bad)
    weight, hessian, _ = problem(4, 30)
    with pytest.raises(SparseGPTError, match="multiples of M"):
        sparsegpt_prune(weight, hessian, 0.5, NMPattern(2, 4), blocksize=16)


def test_wanda_compares_within_rows_with_input_norms():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])
    result = wanda_prune(weight, norms, 0.5)
    # scores row 0: 10, 2, 3, 4 -> prune columns 1, 2; row 1: 40, 3, 2, 1 -> prune columns 2, 3
    assert result.mask.tolist() == [[False, True, True, False], [False, False, True, True]]


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_sparsegpt_error_below_baselines(pattern):
    weight, hessian, inputs = problem(64, 128, tokens=512, seed=3)
    errors = {
        "sparsegpt": sparsegpt_prune(weight, hessian, 0.5, pattern, 32).weight,
        "wanda": wanda_prune(weight, inputs.norm(dim=0), 0.5, pattern).weight,
        "magnitude": magnitude_prune(weight, 0.5, pattern).weight,
    }
    errors = {name: relative_output_error(weight, pruned, hessian) for name, pruned in errors.items()}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"]
    direct = ((weight - magnitude_prune(weight, 0.5, pattern).weight) @ inputs.T).square().sum()
    assert relative_output_error(weight, magnitude_prune(weight, 0.5, pattern).weight, hessian) == pytest.approx(
        float(direct / (weight @ inputs.T).square().sum())
    )
