"""Sparse + low-rank: the closed-form fit, the alternation, the pipeline, and the PEFT adapter it writes."""

import json
from dataclasses import replace

import pytest
import torch
from test_pipeline import calibration
from test_refine import layer

import sparsegpt
from sparsegpt import PruneConfig, prune_model
from sparsegpt.config import variant
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats import adapter, compact
from sparsegpt.models import find_blocks, low_rank_hooks
from sparsegpt.perplexity import perplexity
from sparsegpt.report import low_rank_factors
from sparsegpt.solver import NMPattern, sparsegpt_prune
from sparsegpt.solver.baselines import layer_loss
from sparsegpt.solver.lowrank import alternate_low_rank, fit_low_rank, rank_for_budget

from tiny import tiny_model, tiny_tokenizer


def best_rank_r(residual, inputs, rank):
    """min over rank-r Z of ‖(R − Z)X‖: the rank-r truncation of RX (its rows lie in X's row space), mapped
    back by X's pseudo-inverse. ``inputs`` X is (cols, tokens)."""
    left, singular, right = torch.linalg.svd(residual @ inputs, full_matrices=False)
    return (left[:, :rank] * singular[:rank]) @ right[:rank] @ torch.linalg.pinv(inputs)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_the_closed_form_fit_is_the_least_squares_optimum(rank):
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(9, 40, generator=generator, dtype=torch.float64)
    inputs[2] *= 10  # an outlier feature
    residual = torch.randn(14, 9, generator=generator, dtype=torch.float64)
    b, a = fit_low_rank(residual, inputs @ inputs.T, rank, damp=0.0)
    assert b.shape == (14, rank) and a.shape == (rank, 9)
    torch.testing.assert_close(b @ a, best_rank_r(residual, inputs, rank), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tokens", [4, 64])  # a rank-deficient H too: the fit then uses the damped one
@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_a_fitted_layer_never_loses_more_than_without_factors(tokens, pattern):
    for seed in range(5):
        original, hessian = layer(rows=10, cols=16, tokens=tokens, seed=seed)
        pruned = sparsegpt_prune(original, hessian, 0.5, pattern, blocksize=8).weight
        without = layer_loss(pruned, original, hessian)
        for rank in (1, 4):
            b, a = fit_low_rank(original - pruned, hessian, rank)
            assert layer_loss(pruned + b @ a, original, hessian) <= without * (1 + 1e-12)


def test_alternating_rounds_lower_the_loss_and_keep_the_mask():
    original, hessian = layer(rows=12, cols=16, tokens=64, seed=3)
    result = sparsegpt_prune(original, hessian, 0.5, NMPattern(2, 4), blocksize=8)
    losses = []
    for rounds in (0, 1, 4):
        fit = alternate_low_rank(original, result.weight, result.mask, hessian, 2, rounds)
        assert torch.equal(fit.sparse == 0, result.mask | (result.weight == 0))
        losses.append(layer_loss(fit.sparse + fit.product(), original, hessian))
    assert losses[0] < layer_loss(result.weight, original, hessian)
    assert losses[2] <= losses[1] <= losses[0] and losses[2] < losses[0]


def test_rounds_that_prune_afresh_keep_the_pattern_and_lower_the_loss():
    original, hessian = layer(rows=12, cols=16, tokens=64, seed=3)
    pattern = NMPattern(2, 4)
    result = sparsegpt_prune(original, hessian, 0.5, pattern, blocksize=8)

    def prune(target):
        pruned = sparsegpt_prune(target, hessian, 0.5, pattern, blocksize=8)
        return pruned.weight, pruned.mask

    once = alternate_low_rank(original, result.weight, result.mask, hessian, 2)
    fit = alternate_low_rank(original, result.weight, result.mask, hessian, 2, 4, prune=prune)
    assert bool((fit.pruned.view(12, 4, 4).sum(dim=2) == 2).all())
    assert bool((fit.sparse[fit.pruned] == 0).all())
    assert not torch.equal(fit.pruned, result.mask)  # the mask followed the residual
    loss = layer_loss(fit.sparse + fit.product(), original, hessian)
    assert loss < layer_loss(once.sparse + once.product(), original, hessian)


def test_rank_of_a_budget():
    assert rank_for_budget(576, 576, 0.05) == 14 and rank_for_budget(8, 8, 0.05) == 0
    assert PruneConfig(low_rank_budget=0.05).rank_for(1536, 576) == 20
    assert PruneConfig(low_rank=16).rank_for(8, 4) == 4


def test_rank_zero_and_no_low_rank_prune_alike_bit_for_bit():
    plain, zero = tiny_model("llama"), tiny_model("llama")
    records = prune_model(plain, PruneConfig(sparsity=0.5), calibration())
    zero_records = prune_model(zero, PruneConfig(sparsity=0.5, low_rank=0), calibration())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, zero.state_dict()[name]), name
    assert [r.error for r in records] == [r.error for r in zero_records]
    assert not low_rank_factors(zero_records)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_every_method_gains_from_the_factors(method):
    model = tiny_model("llama")
    config = PruneConfig(method=method, pattern=NMPattern(2, 4), low_rank=4, forward_dtype="none")
    records = prune_model(model, config, calibration())
    assert all(record.rank == 4 and record.error <= record.sparse_error for record in records)
    assert any(record.error < 0.9 * record.sparse_error for record in records)
    for block in find_blocks(model):  # S itself keeps its pattern
        for weight in block.weights:
            groups = (weight.matrix() == 0).reshape(weight.matrix().shape[0], -1, 4).sum(dim=2)
            assert bool((groups >= 2).all()), weight.name


def test_rounds_lower_the_errors_further():
    one, rounds = tiny_model("opt"), tiny_model("opt")
    base = prune_model(one, PruneConfig(pattern=NMPattern(2, 4), low_rank=4), calibration())
    more = prune_model(rounds, PruneConfig(pattern=NMPattern(2, 4), low_rank=4, low_rank_rounds=3), calibration())
    first = [(b, m) for b, m in zip(base, more) if ".layers.0." in b.name]  # same inputs in both runs
    assert all(m.error <= b.error + 1e-12 for b, m in first)
    assert any(m.error < 0.99 * b.error for b, m in first)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_every_method_prunes_afresh_in_the_rounds(method):
    base, remasked = tiny_model("llama"), tiny_model("llama")
    config = PruneConfig(method=method, pattern=NMPattern(2, 4), low_rank=4, low_rank_rounds=2, forward_dtype="none")
    kept = prune_model(base, config, calibration())
    moved = prune_model(remasked, replace(config, low_rank_remask=True), calibration())
    first = [(k, m) for k, m in zip(kept, moved) if ".layers.0." in k.name]  # same inputs in both runs
    assert all(m.error <= m.sparse_error for m in moved)
    assert any(m.error < k.error for k, m in first)
    for block in find_blocks(remasked):  # S keeps its pattern, exactly
        for weight in block.weights:
            groups = (weight.matrix() == 0).reshape(weight.matrix().shape[0], -1, 4).sum(dim=2)
            assert bool((groups >= 2).all()), weight.name


def test_the_next_block_reads_what_s_plus_ba_computes():
    """The recorded errors of block 1 are those of its inputs computed through block 0 with its factors."""
    model = tiny_model("llama")
    windows = calibration()
    records = prune_model(model, PruneConfig(low_rank=4, forward_dtype="none"), windows)
    factors = low_rank_factors(records)
    # prune a copy whose block 0 was already replaced by S + BA merged into dense weights: block 1 must see
    # the same inputs, so its Hessians, and so its results, are the same
    merged = tiny_model("llama")
    prune_model(merged, PruneConfig(low_rank=4, forward_dtype="none", overrides=(("*.layers.1.*", None),)), windows)
    for block in find_blocks(merged)[:1]:
        for weight in block.weights:
            b, a = factors[weight.name]
            weight.write(weight.matrix() + b @ a)
    again = prune_model(
        merged, PruneConfig(low_rank=4, forward_dtype="none", overrides=(("*.layers.0.*", None),)), windows
    )
    later = [record for record in records if ".layers.1." in record.name]
    assert [r.name for r in later] == [r.name for r in again]
    for first, second in zip(later, again):
        assert first.error == pytest.approx(second.error, rel=1e-4), first.name


def windows_logits(model):
    with torch.no_grad():
        return model(input_ids=calibration(2, 16, seed=9)).logits


def test_saved_folder_applies_its_adapter_through_peft_and_our_loader(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    config = PruneConfig(low_rank_budget=0.2, pattern=NMPattern(2, 4))
    records = prune_model(model, config, calibration())
    factors = low_rank_factors(records)
    assert len({a.shape[0] for _, a in factors.values()}) > 1  # ranks differ by layer shape
    result = sparsegpt.PruneResult(model, tiny_tokenizer(), config, records, 1.0, "tiny", None)
    with low_rank_hooks(model, factors):
        expected = windows_logits(model)
    sparse_only = windows_logits(model)
    assert not torch.allclose(expected, sparse_only)
    result.save(tmp_path / "plain")
    result.save(tmp_path / "compact", compact_format=True)
    report = json.loads((tmp_path / "plain" / "sparsegpt_report.json").read_text())
    assert report["low_rank"]["layers"] == len(factors) and 0 < report["low_rank"]["share"] < 0.2
    assert all(layer["rank"] and layer["sparse_error"] >= layer["error"] for layer in report["layers"])

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")  # transformers alone: S
    torch.testing.assert_close(windows_logits(base), sparse_only)
    with_peft = PeftModel.from_pretrained(base, tmp_path / "plain" / adapter.ADAPTER_FOLDER)
    torch.testing.assert_close(windows_logits(with_peft), expected, rtol=1e-5, atol=1e-5)
    for folder, runtime in [("plain", "dense"), ("compact", "dense"), ("compact", "sparse"), ("plain", "sparse")]:
        loaded = sparsegpt.load_pretrained(tmp_path / folder, runtime=runtime)
        torch.testing.assert_close(windows_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "compact" / compact.MANIFEST).read_text())
    assert manifest["version"] == 2 and manifest["low_rank"] == adapter.ADAPTER_FOLDER


def test_a_compact_folder_without_low_rank_stays_version_1(tmp_path):
    result = sparsegpt.prune((tiny_model("llama"), tiny_tokenizer()), PruneConfig(method="magnitude"), None)
    result.save(tmp_path / "compact", compact_format=True)
    assert json.loads((tmp_path / "compact" / compact.MANIFEST).read_text())["version"] == 1


def test_a_version_2_folder_that_lost_its_factors_is_refused(tmp_path):
    import shutil

    model = tiny_model("llama")
    config = PruneConfig(low_rank=2)
    result = sparsegpt.PruneResult(
        model, tiny_tokenizer(), config, prune_model(model, config, calibration()), 1.0, "tiny", None
    )
    result.save(tmp_path / "compact", compact_format=True)
    shutil.rmtree(tmp_path / "compact" / adapter.ADAPTER_FOLDER)
    with pytest.raises(SparseGPTError, match="low-rank terms the folder lacks"):
        sparsegpt.load_pretrained(tmp_path / "compact")


def test_gpt2_conv1d_layers_get_their_terms_and_peft_reads_them(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2")
    config = PruneConfig(low_rank=3)
    records = prune_model(model, config, calibration())
    factors = low_rank_factors(records)
    with low_rank_hooks(model, factors):
        expected = windows_logits(model)
    sparsegpt.PruneResult(model, tiny_tokenizer(), config, records, 1.0, "tiny", None).save(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / adapter.ADAPTER_FOLDER / adapter.CONFIG_NAME).read_text())["fan_in_fan_out"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    with_peft = PeftModel.from_pretrained(base, tmp_path / "plain" / adapter.ADAPTER_FOLDER)
    torch.testing.assert_close(windows_logits(with_peft), expected, rtol=1e-5, atol=1e-5)


def test_streamed_prune_matches_in_memory_with_its_factors(tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsegpt.streaming import driver as streamed

    from tiny import llama_folder

    llama_folder(tmp_path, layers=2)
    windows = calibration()
    config = PruneConfig(low_rank=3, low_rank_rounds=1)
    run = streamed.prune_streamed(tmp_path / "model", tmp_path / "out", config, windows)
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    records = prune_model(in_memory, config, windows)
    streamed_model = AutoModelForCausalLM.from_pretrained(run.out)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, streamed_model.state_dict()[name]), name
    saved = adapter.read_adapter(run.out)
    for name, (b, a) in low_rank_factors(records).items():
        assert torch.equal(saved[name][0], b) and torch.equal(saved[name][1], a), name
    scored = calibration(3, 16, seed=4)
    with low_rank_hooks(in_memory, low_rank_factors(records)):
        expected = perplexity(in_memory, scored, precision=None)
    assert streamed.perplexity_streamed(run.out, scored) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "settings_, message",
    [
        (dict(low_rank=4, low_rank_budget=0.1), "not both"),
        (dict(low_rank_budget=1.5), "must be in"),
        (dict(low_rank_rounds=2), "give --low-rank"),
        (dict(low_rank=4, low_rank_rounds=1, bits=4), "off the quantization grid"),
        (dict(low_rank=4, low_rank_remask=True), "give --low-rank-rounds"),
        (dict(low_rank=-1), "non-negative"),
    ],
)
def test_bad_low_rank_settings_are_refused(settings_, message):
    with pytest.raises(SparseGPTError, match=message):
        PruneConfig(**settings_)


def test_expert_banks_are_refused_with_a_reason():
    with pytest.raises(SparseGPTError, match="fused bank"):
        prune_model(tiny_model("qwen2_moe"), PruneConfig(low_rank=2), calibration())


def test_lowrank_variant_takes_the_given_rank_and_rounds():
    config = PruneConfig(low_rank=8, low_rank_rounds=2)
    assert variant(config, "sparsegpt").low_rank == 0 and variant(config, "sparsegpt").low_rank_rounds == 0
    assert variant(config, "wanda+lowrank").low_rank == 8 and variant(config, "wanda+lowrank").low_rank_rounds == 2
    assert variant(PruneConfig(), "sparsegpt+lowrank").low_rank == 16
    budget = variant(PruneConfig(low_rank_budget=0.05), "sparsegpt+lowrank")
    assert budget.low_rank == 0 and budget.low_rank_budget == 0.05


def test_owl_and_quantization_compose_with_the_term():
    owl = prune_model(
        tiny_model("llama"), PruneConfig(sparsity=0.6, allocation="owl", owl_lambda=0.1, low_rank=2), calibration()
    )
    quantized = prune_model(tiny_model("llama"), PruneConfig(bits=4, group_size=16, low_rank=2), calibration())
    for records in (owl, quantized):
        assert all(r.rank == 2 and r.error <= r.sparse_error * (1 + 1e-6) for r in records)
    assert all(r.scales is not None for r in quantized)
