"""The sequential pipeline on tiny models of every supported architecture."""

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparsegpt import PruneConfig, pipeline, prune_model
from sparsegpt.errors import SparseGPTError
from sparsegpt.models import find_blocks
from sparsegpt.pipeline import resolve_forward_dtype
from sparsegpt.solver import NMPattern, pruned_count, sparsegpt_prune

from tiny import ARCHITECTURES, VOCAB, AutocastAlone, tiny_model


def calibration(nsamples=6, seqlen=16, seed=1):
    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def assert_pruned(matrix, sparsity, pattern, name):
    """Exactly the layer's count of zeros (unstructured), or exactly N zeros in every group of M (N:M)."""
    if pattern is None:
        assert int((matrix == 0).sum()) == pruned_count(sparsity, matrix.numel()), name
    else:
        groups = (matrix == 0).view(matrix.shape[0], -1, pattern.m).sum(dim=2)
        assert torch.all(groups == pattern.n), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_prunes_end_to_end(arch):
    model = tiny_model(arch)
    weights = [weight for block in find_blocks(model) for weight in block.weights]
    records = prune_model(model, PruneConfig(batch_size=4), calibration())  # batches of 4 and 2 windows
    assert [record.name for record in records] == [weight.name for weight in weights]
    for weight in weights:
        assert_pruned(weight.matrix(), 0.5, None, weight.name)
    logits = model(calibration(2)).logits
    assert torch.isfinite(logits).all()
    if arch in ("mixtral", "qwen2_moe"):
        experts = [weight for weight in weights if weight.expert is not None]
        assert len(experts) == 2 * 2 * 4  # blocks x (gate_up, down) x experts


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_n_of_m_and_wanda_and_magnitude_end_to_end(arch):
    for config in (
        PruneConfig(pattern=NMPattern(2, 4), blocksize=16),
        PruneConfig(method="wanda", sparsity=0.6),
        PruneConfig(method="magnitude", pattern=NMPattern(4, 8)),
    ):
        model = tiny_model(arch)
        records = prune_model(model, config, calibration())
        for block in find_blocks(model):
            for weight in block.weights:
                assert_pruned(weight.matrix(), 0.6, config.pattern, weight.name)
        assert all(record.error is not None for record in records) == config.needs_hessian


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_bfloat16_model_prunes_with_float32_statistics(pattern):
    """A bf16 model: activations stay bf16, the Hessians and the solve run in fp32, weights return as bf16."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    records = prune_model(model, PruneConfig(pattern=pattern, blocksize=16), calibration())
    for block in find_blocks(model):
        for weight in block.weights:
            assert weight.matrix().dtype == torch.bfloat16
            assert_pruned(weight.matrix(), 0.5, pattern, weight.name)
    assert all(record.error is not None and 0 <= record.error < 1 for record in records)
    assert torch.isfinite(model(calibration(2)).logits.float()).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_forward_passes_keep_float32_weights_and_close_errors(arch):
    """--forward-dtype bfloat16: the forwards run under autocast, yet the weights stay fp32, the Hessians
    see the inputs the bf16 forward produced, and every layer's error stays close to the fp32 run's."""
    plain, fast = tiny_model(arch), tiny_model(arch)
    exact = prune_model(plain, PruneConfig(blocksize=16, forward_dtype="none"), calibration())
    records = prune_model(fast, PruneConfig(blocksize=16, forward_dtype="bfloat16"), calibration())
    for block in find_blocks(fast):
        for weight in block.weights:
            assert weight.matrix().dtype == torch.float32
            assert_pruned(weight.matrix(), 0.5, None, weight.name)
    for mine, reference in zip(records, exact):
        assert mine.error == pytest.approx(reference.error, rel=0.1, abs=0.01), mine.name
    # autocast really ran: the first block's statistics come from bf16 activations, so results differ
    assert any(mine.error != reference.error for mine, reference in zip(records, exact))
    with pytest.raises(SparseGPTError, match="unknown forward dtype 'int8'"):
        PruneConfig(forward_dtype="int8")


def test_auto_forward_precision_is_bf16_only_where_measured_accurate(monkeypatch):
    cpu = torch.device("cpu")
    auto = PruneConfig(forward_dtype="auto")
    for native in (True, False):
        monkeypatch.setattr(pipeline, "fast_bfloat16", lambda device, native=native: native)
        assert resolve_forward_dtype(auto, torch.float32, cpu) == ("bfloat16" if native else None)
        assert resolve_forward_dtype(auto, torch.bfloat16, cpu) is None  # already 16-bit
        assert resolve_forward_dtype(auto, torch.float64, cpu) is None  # asked for exactness
        for other in (
            PruneConfig(forward_dtype="auto", pattern=NMPattern(2, 4)),
            PruneConfig(forward_dtype="auto", bits=4),
        ):
            assert resolve_forward_dtype(other, torch.float32, cpu) is None
        for wanda in (PruneConfig(method="wanda"), PruneConfig(method="wanda", pattern=NMPattern(2, 4))):
            assert resolve_forward_dtype(wanda, torch.float32, cpu) == ("bfloat16" if native else None)
        assert resolve_forward_dtype(PruneConfig(forward_dtype="none"), torch.float32, cpu) is None
        assert resolve_forward_dtype(PruneConfig(forward_dtype=None), torch.float32, cpu) is None
        assert resolve_forward_dtype(PruneConfig(forward_dtype="float16"), torch.float32, cpu) == "float16"
    # "auto" prunes, whichever precision it resolves to on this machine
    model = tiny_model("llama")
    records = prune_model(model, PruneConfig(blocksize=16, forward_dtype="auto"), calibration())
    assert all(0 <= record.error < 1 for record in records)


def test_layers_reading_the_same_inputs_share_one_factorization(monkeypatch):
    """q/k/v and gate/up read one tensor each: a llama block needs 4 factorizations, not 7; the weights come
    out exactly as when every layer factorizes its own copy of the Hessian."""
    calls = []
    factorize = pipeline.inverse_factor
    monkeypatch.setattr(
        pipeline, "inverse_factor", lambda *args, **kwargs: calls.append(1) or factorize(*args, **kwargs)
    )
    shared, alone = tiny_model("llama"), tiny_model("llama")
    prune_model(shared, PruneConfig(blocksize=16), calibration())
    blocks = find_blocks(shared)
    assert len(calls) == 4 * len(blocks)
    monkeypatch.setattr(
        pipeline,
        "_shared_factor",
        lambda factors, stats, hessian, config, dtype, last: factorize(hessian, config.damp, dtype=dtype),
    )
    prune_model(alone, PruneConfig(blocksize=16), calibration())
    for mine, reference in zip(shared.state_dict().values(), alone.state_dict().values()):
        assert torch.equal(mine, reference)


def test_restored_model_prunes_like_a_fresh_one():
    """Pruning leaves no state behind: a model restored after earlier prunes prunes bit for bit like a fresh one."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model.state_dict())
    prune_model(model, PruneConfig(), calibration())
    prune_model(model, PruneConfig(method="magnitude", pattern=NMPattern(2, 4)))
    model.load_state_dict(dense)
    fresh = tiny_model("llama")
    config = PruneConfig(pattern=NMPattern(2, 4), blocksize=16)
    prune_model(model, config, calibration())
    prune_model(fresh, config, calibration())
    for (name, restored), new in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(restored, new), name


def _hooked_hessians(model, block, batches):
    """The Hessians of ``block``'s linear layers from plain forward hooks on a whole-model forward."""
    sums, counts, handles = {}, {}, []
    for weight in block.weights:
        module = model.get_submodule(weight.name)

        def hook(module, inputs, output, name=weight.name):
            rows = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]

        handles.append(module.register_forward_hook(hook))
    for batch in batches:
        model(batch)
    for handle in handles:
        handle.remove()
    return {name: 2 * sums[name] / counts[name] for name in sums}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bloom", "opt"])
def test_pipeline_equals_layerwise_solves_on_pruned_prefix(arch):
    """Block i must be solved on the inputs produced by blocks < i *after* they were pruned."""
    dense = tiny_model(arch, dtype=torch.float64)
    pruned = copy.deepcopy(dense)
    windows = calibration(5, 12)
    prune_model(pruned, PruneConfig(blocksize=16, batch_size=2), windows)
    dense_blocks, pruned_blocks = find_blocks(dense), find_blocks(pruned)
    for index, block in enumerate(dense_blocks):
        probe = copy.deepcopy(pruned)
        probe_blocks = find_blocks(probe)
        for weight, original in zip(probe_blocks[index].weights, block.weights):
            weight.write(original.matrix())
        hessians = _hooked_hessians(probe, probe_blocks[index], windows.split(3))
        for original, result in zip(block.weights, pruned_blocks[index].weights):
            expected = sparsegpt_prune(original.matrix(), hessians[original.name], 0.5, blocksize=16).weight
            torch.testing.assert_close(result.matrix(), expected, rtol=1e-7, atol=1e-9, msg=original.name)


def test_layers_reading_one_input_share_statistics():
    from sparsegpt.pipeline import LinearInputObserver

    model = tiny_model("llama")
    block = find_blocks(model)[0]
    observer = LinearInputObserver(block.weights, torch.device("cpu"))
    with observer:
        observer.next_batch()
        block.module(
            torch.randn(1, 5, 32),
            position_embeddings=model.model.rotary_emb(torch.randn(1, 5, 32), torch.arange(5)[None]),
            attention_mask=None,
        )
    stats = {name.split(".")[-1]: value for name, value in observer.statistics.items()}
    assert stats["q_proj"] is stats["k_proj"] is stats["v_proj"]
    assert stats["gate_proj"] is stats["up_proj"]
    assert stats["o_proj"] is not stats["q_proj"] and stats["down_proj"] is not stats["gate_proj"]
    assert stats["q_proj"].tokens == 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_observing_stops_each_forward_after_the_last_weight_input(arch):
    """From the second batch on, the dense forward ends at the last linear layer's input: the statistics
    are those of whole forwards, with one matrix product (and what follows it) fewer per batch."""
    model = tiny_model(arch)
    block = find_blocks(model)[0]
    batches = list(calibration(6, 16).split(2))
    hidden, calls = pipeline.capture_block_inputs(model, find_blocks(model), batches)
    products = []

    class Products(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            # F.linear, or the oneDNN product that float32_linears sends it to on hosts where that is faster
            if func in (torch.nn.functional.linear, torch.addmm, torch.ops.mkldnn._linear_pointwise):
                products.append(func)
            return func(*args, **(kwargs or {}))

    with Products():
        whole = pipeline.observe_block(block, block.weights, hidden, calls[0], torch.device("cpu"), outputs=[])
        whole_products = len(products)
        products.clear()
        cut = pipeline.observe_block(block, block.weights, hidden, calls[0], torch.device("cpu"))
    assert whole_products > 0 and len(products) == whole_products - (len(batches) - 1)
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name].gram, cut[name].gram) and whole[name].tokens == cut[name].tokens


def test_bf16_forwards_round_each_shared_linear_input_once(monkeypatch):
    """Under bf16 forwards an input that several layers read (q, k, v; gate, up) is rounded once for the
    layers and their statistics together, where autocast alone rounds it once per layer and again for the
    statistics; the block's outputs and statistics are bitwise the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_model("llama")
    block, width = find_blocks(model)[0], model.config.hidden_size
    weights = {parameter.data_ptr() for parameter in model.parameters()}  # autocast rounds them once anyway
    hidden, calls = pipeline.capture_block_inputs(model, find_blocks(model), list(calibration(4, 16).split(2)))

    class Roundings(TorchDispatchMode):  # float32 activations of the model's width rounded to bf16
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            source = args[0] if args else None
            if (
                func is torch.ops.aten._to_copy.default
                and source.dtype == torch.float32
                and kwargs.get("dtype") == torch.bfloat16
                and source.ndim in (2, 3)  # (batch, tokens, width) or the statistics' (rows, width)
                and source.shape[-1] == width
                and source.data_ptr() not in weights
            ):
                Roundings.count += 1
            return func(*args, **kwargs)

    def run():
        Roundings.count, outputs = 0, []
        with Roundings():
            stats = pipeline.observe_block(
                block, block.weights, hidden, calls[0], torch.device("cpu"), outputs=outputs, forward_dtype="bfloat16"
            )
            pipeline.advance_block(block, [states.clone() for states in hidden], calls[0], "bfloat16")
        return stats, outputs, Roundings.count

    shared_stats, shared_outputs, shared_count = run()
    monkeypatch.setattr(pipeline, "SharedInputCasts", AutocastAlone)
    plain_stats, plain_outputs, plain_count = run()
    # per batch: two shared inputs (attention's, the MLP's), in the observing and the advancing forward
    assert shared_count == 2 * 2 * len(hidden)
    # autocast alone: q, k, v and gate, up each, in both forwards, and the two statistics' own roundings
    assert plain_count == (5 + 5 + 2) * len(hidden)
    assert all(torch.equal(a, b) for a, b in zip(shared_outputs, plain_outputs))
    assert shared_stats.keys() == plain_stats.keys()
    for name in shared_stats:
        assert torch.equal(shared_stats[name].gram, plain_stats[name].gram), name


def test_overrides_skip_and_set_sparsity():
    model = tiny_model("llama")
    config = PruneConfig(overrides=(("*.mlp.*", 0.25), ("*.layers.1.*", None)))
    records = prune_model(model, config, calibration())
    names = {record.name: record for record in records}
    assert not any(".layers.1." in name for name in names)
    assert names["model.layers.0.mlp.down_proj"].sparsity == 0.25
    assert names["model.layers.0.self_attn.q_proj"].sparsity == 0.5
    assert not (model.model.layers[1].mlp.down_proj.weight == 0).any()
    with pytest.raises(SparseGPTError, match="no prunable layers"):
        prune_model(tiny_model("llama"), PruneConfig(overrides=(("*", None),)), calibration())


def test_bad_numbers_are_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SparseGPTError, match="NaN or Inf"):
        prune_model(model, PruneConfig(), calibration())
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e30)  # finite weights, infinite activations
        model.model.layers[0].mlp.down_proj.weight.mul_(1e30)
    with pytest.raises(SparseGPTError, match="NaN or Inf"):
        prune_model(model, PruneConfig(), calibration())
    with pytest.raises(SparseGPTError, match="not divisible"):
        prune_model(tiny_model("llama"), PruneConfig(pattern=NMPattern(2, 3), blocksize=3), calibration())


def test_allocator_tuning_applies_on_glibc():
    import platform

    from sparsegpt.host import keep_freed_memory

    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
