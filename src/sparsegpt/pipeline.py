"""The one sequential driver, for every architecture.

1. Capture what each decoder block receives (hidden states and every other positional or keyword
   argument: masks, position ids, rotary embeddings, cache positions, alibi...) by running the model with
   each block's forward replaced by a recorder; the last recorder stops the forward, so no block and no
   lm_head is computed.
2. For each block: run it over all calibration batches while observing the inputs of its linear weights
   (layers reading the same tensor share one set of statistics), prune every weight, then run the pruned
   block again to produce the next block's inputs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from sparsegpt.config import DEFAULT_REFINE, PruneConfig
from sparsegpt.distributed import Ranks
from sparsegpt.errors import SparseGPTError
from sparsegpt.fused import fused_steps_on
from sparsegpt.host import fast_bfloat16, float32_linears, native_attention, product_backend
from sparsegpt.linears import SharedInputCasts
from sparsegpt.models import (
    Block,
    LinearWeight,
    check_finite_weights,
    find_blocks,
    low_rank_hooks,
    prefer_eager_experts,
)
from sparsegpt.report import LayerRecord, low_rank_factors
from sparsegpt.solver import (
    InputStatistics,
    InverseFactor,
    SolveResult,
    inverse_factor,
    magnitude_prune,
    relative_output_error,
    sparsegpt_prune,
    wanda_prune,
)
from sparsegpt.solver.allocation import outlier_count, owl_counts
from sparsegpt.solver.lowrank import Prune, alternate_low_rank
from sparsegpt.solver.refine import fixed_mask, mask_scores, refine_weights, repair_mask

log = logging.getLogger(__name__)


@dataclass
class BlockCall:
    """One recorded call of a block, with its hidden-states argument left out."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_position: int | None  # index in args, or None when passed as hidden_states=...

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        if self.hidden_position is None:
            kwargs["hidden_states"] = hidden
        else:
            args.insert(self.hidden_position, hidden)
        output = block(*args, **kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    pass


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(args[1:], kwargs, 0)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs, None)


def _share_equal_tensors(call: BlockCall, pool: list[torch.Tensor]) -> None:
    """Replace tensors in ``call`` that equal one already kept (e.g. from the previous batch) by that one."""

    def shared(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            for kept in pool:
                if kept is value:
                    return kept
                if kept.shape == value.shape and kept.dtype == value.dtype and torch.equal(kept, value):
                    return kept
            pool.append(value)
            return value
        if isinstance(value, tuple):
            return tuple(shared(item) for item in value)
        return value

    call.args = tuple(shared(value) for value in call.args)
    call.kwargs = {key: shared(value) for key, value in call.kwargs.items()}


def _shaped(template: Any, states: torch.Tensor) -> Any:
    """``states`` in the structure a block returns (a tensor, or a tuple whose first item is the states)."""
    return (states, *template[1:]) if isinstance(template, (tuple, list)) else states


def capture_block_inputs(
    model: nn.Module, blocks: list[Block], batches: list[torch.Tensor], template: list[Any] | None = None
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Hidden states entering the first block, per batch, and every block's other arguments, per batch.

    Only the first block runs (once, to learn the structure blocks return; appended to ``template`` when
    given), so the other blocks may hold no weights. Returns (hidden[b], calls[block][b]).
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = []
    template = [] if template is None else template  # the real output of block 0
    pool: list[torch.Tensor] = []

    def recorder(index: int, block: nn.Module) -> Callable[..., Any]:
        real_forward = block.forward

        def record(*args: Any, **kwargs: Any) -> Any:
            states, call = _split_hidden(args, kwargs)
            _share_equal_tensors(call, pool)
            calls[-1].append(call)
            if index == 0:
                hidden.append(states)
            if index == len(blocks) - 1:
                raise _StopForward
            if not template:
                template.append(real_forward(*args, **kwargs))
            return _shaped(template[0], states)

        return record

    for position, block in enumerate(blocks):
        block.module.forward = recorder(position, block.module)
    try:
        for batch in batches:
            calls.append([])
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            except _StopForward:
                pass
            if len(calls[-1]) != len(blocks):
                raise SparseGPTError(
                    f"the model ran {len(calls[-1])} of its {len(blocks)} decoder blocks; cannot prune it layer by layer"
                )
    finally:
        for block in blocks:
            del block.module.forward
    return hidden, [list(per_block) for per_block in zip(*calls)]


@torch.no_grad()
def logits_after_blocks(
    model: nn.Module, blocks: list[nn.Module], batch: torch.Tensor, final: torch.Tensor, template: Any
) -> torch.Tensor:
    """The model's logits for ``batch`` when its last block outputs ``final``: the forward runs the
    embeddings and the head but no block (each passes its input on), so blocks may hold no weights."""

    def passing(last: bool) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            states, _ = _split_hidden(args, kwargs)
            return _shaped(template, final if last else states)

        return forward

    for position, block in enumerate(blocks):
        block.forward = passing(position == len(blocks) - 1)
    try:
        return model(input_ids=batch, use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward


class LinearInputObserver(TorchFunctionMode):
    """Accumulates the inputs of known weights as the forward pass hands them to ``F.linear``/``addmm``.

    Weights are recognised by their storage address and shape, so the same code sees ``nn.Linear``,
    GPT-2's ``Conv1D`` and slices of fused expert banks. Weights that read the very same input tensor
    (q/k/v, gate/up) share one ``InputStatistics``; ``full=False`` keeps only the column norms.
    ``operands``: the precision the layers multiply in under autocast (their inputs are rounded to it
    before their products are summed), or None; ``casts`` (the autocast context's, see
    ``forward_precision``) rounds each input once, for the layers and the statistics alike.

    With ``stop_early``, a forward is cut short (``_StopForward``) as soon as every weight has had its
    input: nothing after the block's last linear input (its matrix product, the residual add) is computed.
    This starts from the second batch, and only when the first showed each weight read exactly once per
    forward (a weight used twice, or an expert no token reached, keeps the forwards whole).
    """

    def __init__(
        self,
        weights: list[LinearWeight],
        device: torch.device,
        full: bool = True,
        operands: torch.dtype | None = None,
        stop_early: bool = False,
        casts: SharedInputCasts | None = None,
    ) -> None:
        super().__init__()
        self.casts = casts
        self.by_key = {weight.key: weight for weight in weights}
        self.device = device
        self.full = full
        self.operands = operands
        # the host's faster Gram kernel for the rows these layers multiply (float64 rows ignore it)
        self.backend = product_backend(operands or torch.float32) if full and device.type == "cpu" else "mkl"
        self.statistics: dict[str, InputStatistics] = {}
        self._seen: list[tuple[torch.Tensor, InputStatistics]] = []
        self._reads: dict[str, int] = {}  # weight name -> inputs read in this forward
        self._stop_early = stop_early
        self._batches = 0

    def next_batch(self) -> None:
        if self._batches == 1:  # the first forward ran whole: may the next ones stop early?
            once = len(self._reads) == len(self.by_key) and all(reads == 1 for reads in self._reads.values())
            self._stop_early = self._stop_early and once
        self._batches += 1
        self._seen.clear()
        self._reads.clear()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            inputs, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            rounded = self.casts.cast(inputs) if self.casts is not None else inputs
            self._observe(inputs, weight, rounded)
            args = (rounded, *args[1:])
        elif func is torch.addmm and len(args) >= 3:
            self._observe(args[1], args[2], args[1])
        return func(*args, **kwargs)

    def _observe(self, inputs: torch.Tensor, stored: torch.Tensor, rounded: torch.Tensor) -> None:
        """``rounded``: ``inputs`` as the layer multiplies them (``casts``); ``inputs`` tells which weights
        share them."""
        weight = self.by_key.get((stored.data_ptr(), tuple(stored.shape)))
        if weight is None:
            return
        self._accumulate(weight, inputs, rounded)
        self._reads[weight.name] = self._reads.get(weight.name, 0) + 1
        if self._stop_early and self._batches > 1 and len(self._reads) == len(self.by_key):
            raise _StopForward

    def _accumulate(self, weight: LinearWeight, inputs: torch.Tensor, rounded: torch.Tensor) -> None:
        shared = next((stats for seen, stats in self._seen if seen is inputs), None)
        statistics = self.statistics.get(weight.name)
        if statistics is None:
            if shared is not None:
                self.statistics[weight.name] = shared
                return
            dtype = torch.float64 if inputs.dtype == torch.float64 else torch.float32
            operands = self.operands if dtype == torch.float32 else None
            statistics = InputStatistics(inputs.shape[-1], dtype, self.device, self.full, operands, self.backend)
            self.statistics[weight.name] = statistics
        elif shared is statistics:
            return
        statistics.add(rounded.detach())
        self._seen.append((inputs, statistics))


def _solve(
    weight: LinearWeight,
    sparsity: float,
    config: PruneConfig,
    stats: InputStatistics | None,
    last: bool,
    factors: dict[int, InverseFactor],
) -> LayerRecord:
    """Prune one weight in place; ``last``: no other weight reads ``stats`` (its memory may be reused).
    ``factors`` keeps the inverse factor of statistics that later weights read too (by ``id``)."""
    started = time.perf_counter()
    compute = torch.float64 if weight.parameter.dtype == torch.float64 else torch.float32
    original = weight.matrix().detach().to(compute)  # not a copy when already in compute precision
    note = None
    swaps = refine_iterations = None
    reached = stats is not None and stats.tokens > 0
    hessian = None
    # before the Hessian is taken from the statistics (a low-rank term needs it for Wanda too)
    column_norms = stats.column_norms() if stats is not None and reached and config.method == "wanda" else None
    if stats is not None and reached and stats.full:
        hessian = stats.take_hessian() if last else stats.hessian()
    pattern = config.pattern
    factor = None
    if config.method == "magnitude" or not reached:
        if config.method != "magnitude":
            note = "no calibration token reached this layer: pruned by magnitude"
            log.warning("%s: %s", weight.name, note)
        if config.grid is None:
            result: SolveResult = magnitude_prune(original, sparsity, pattern)
        else:  # with a unit Hessian the sweep is magnitude pruning plus rounding to the nearest grid point
            unit = torch.eye(original.shape[1], dtype=compute, device=original.device)
            result = sparsegpt_prune(original, unit, sparsity, pattern, config.blocksize, 0.0, config.grid)
            note = f"{note} and rounded to the grid"
    elif config.method == "wanda":
        assert column_norms is not None
        result = wanda_prune(original, column_norms, sparsity, pattern)
    else:
        assert hessian is not None and stats is not None
        try:
            factor = _shared_factor(factors, stats, hessian, config, compute, last)
            result = sparsegpt_prune(
                original,
                factor,
                sparsity,
                pattern,
                config.blocksize,
                config.damp,
                config.grid,
                _preset(config, original, hessian, sparsity),
            )
        except SparseGPTError as error:
            raise SparseGPTError(f"{weight.name}: {error}") from None
        if result.damp != config.damp:
            note = f"Cholesky failed at damp {config.damp:g}; succeeded at {result.damp:g}"
        if result.dead_inputs:
            dead = f"{result.dead_inputs} inputs never fired in calibration"
            note = f"{note}; {dead}" if note else dead
        if config.repair:
            group = pattern.m if pattern is not None else None
            result.weight, result.mask, swaps = repair_mask(
                result.weight, original, hessian, result.mask, config.repair, group, result.damp
            )
        if config.refine:
            refined = refine_weights(result.weight, original, hessian, result.mask, config.refine, result.damp)
            result.weight, refine_iterations = refined.weight, refined.iterations
    rank = config.rank_for(*original.shape) if config.uses_low_rank and hessian is not None else 0
    fit, sparse_error = None, None
    if rank:
        assert hessian is not None
        fit_damp = result.damp if config.method == "sparsegpt" else config.damp
        reprune = _pruner(config, sparsity, column_norms, factor, fit_damp) if config.low_rank_remask else None
        try:
            fit = alternate_low_rank(
                original,
                result.weight,
                result.mask,
                hessian,
                rank,
                config.low_rank_rounds,
                fit_damp,
                config.refine or DEFAULT_REFINE,
                reprune,
            )
        except SparseGPTError as error:
            raise SparseGPTError(f"{weight.name}: {error}") from None
        sparse_error = relative_output_error(original, result.weight, hessian)
        result.weight, result.mask = fit.sparse, fit.pruned
    error = None
    if hessian is not None:
        error = relative_output_error(original, result.weight + fit.product() if fit else result.weight, hessian)
    solved_with_hessian = hessian is not None
    del original, hessian
    weight.write(result.weight)
    pruned = weight.matrix()
    return LayerRecord(
        name=weight.name,
        shape=list(pruned.shape),
        sparsity=float((pruned == 0).sum()) / pruned.numel(),
        error=error,
        seconds=time.perf_counter() - started,
        damp=result.damp if config.method == "sparsegpt" and solved_with_hessian else None,
        note=note,
        swaps=swaps,
        refine_iterations=refine_iterations,
        scales=result.scales,
        zeros=result.zeros,
        rank=fit.rank if fit else None,
        sparse_error=sparse_error,
        lora_b=fit.b if fit else None,
        lora_a=fit.a if fit else None,
    )


def _pruner(
    config: PruneConfig,
    sparsity: float,
    column_norms: torch.Tensor | None,
    factor: InverseFactor | None,
    damp: float,
) -> Prune:
    """The layer's method as a function of the weight it prunes (the low-rank rounds re-prune W − BA):
    SparseGPT's sweep with the layer's inverse factor, Wanda with its column norms, or magnitude. Only
    layers that calibration reached get factors, so the factor and the norms are there for their methods."""

    def prune(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if config.method == "sparsegpt":
            assert factor is not None
            result = sparsegpt_prune(target, factor, sparsity, config.pattern, config.blocksize, damp)
        elif config.method == "wanda":
            assert column_norms is not None
            result = wanda_prune(target, column_norms, sparsity, config.pattern)
        else:
            result = magnitude_prune(target, sparsity, config.pattern)
        return result.weight, result.mask

    return prune


def _shared_factor(
    factors: dict[int, InverseFactor],
    stats: InputStatistics,
    hessian: torch.Tensor,
    config: PruneConfig,
    dtype: torch.dtype,
    last: bool,
) -> InverseFactor:
    """The inverse factor of ``stats``' Hessian: computed by the first weight that reads these inputs,
    kept for the others, given up by the last (``last``)."""
    factor = factors.pop(id(stats), None) if last else factors.get(id(stats))
    if factor is None:
        factor = inverse_factor(hessian, config.damp, dtype=dtype)
        if not last:
            factors[id(stats)] = factor
    return factor


def _preset(config: PruneConfig, weight: torch.Tensor, hessian: torch.Tensor, sparsity: float) -> torch.Tensor | None:
    """The mask fixed before the sweep by ``config.mask_score`` (None: SparseGPT chooses it adaptively)."""
    if config.mask_score == "sparsegpt":
        return None
    column_norms = hessian.diagonal().clamp_min(0).sqrt()  # ∝ ‖X_j‖; a common factor changes no order
    scores = mask_scores(config.mask_score, weight, column_norms)
    pattern = config.pattern
    return fixed_mask(scores, sparsity, (pattern.n, pattern.m) if pattern is not None else None)


def chosen_weights(block: Block, config: PruneConfig) -> list[tuple[LinearWeight, float]]:
    """The weights of ``block`` to prune, with their sparsity; checks N:M divisibility."""
    chosen = []
    for weight in block.weights:
        sparsity = config.sparsity_for(weight.name)
        if sparsity is None:
            continue
        width = weight.matrix().shape[1]
        if config.pattern is not None and width % config.pattern.m:
            raise SparseGPTError(f"{weight.name}: input width {width} is not divisible by M={config.pattern.m}")
        if config.uses_low_rank and weight.expert is not None:
            raise SparseGPTError(
                f"{weight.name} is one expert of a fused bank: a low-rank term needs a linear module of its own"
            )
        chosen.append((weight, sparsity))
    return chosen


def _selected(blocks: list[Block], config: PruneConfig) -> list[tuple[Block, list[tuple[LinearWeight, float]]]]:
    """Each block with the weights to prune and their sparsity; checks N:M divisibility up front."""
    plan = [(block, chosen_weights(block, config)) for block in blocks]
    if not any(chosen for _, chosen in plan):
        raise SparseGPTError("no prunable layers: every linear layer of the model is skipped")
    return plan


def _check_finite(hidden: torch.Tensor, where: str) -> None:
    # the extremes are finite exactly when every entry is (a NaN becomes both): one pass that writes
    # nothing, where ``isfinite(hidden).all()`` writes a mask and reads it again
    if hidden.numel() and not all(math.isfinite(extreme) for extreme in torch.aminmax(hidden)):
        raise SparseGPTError(f"activations became NaN or Inf {where}")


@contextlib.contextmanager
def forward_precision(
    forward_dtype: str | None, device: torch.device, module: nn.Module | None = None
) -> Iterator[SharedInputCasts | None]:
    """Autocast to ``forward_dtype`` for block forwards (a resolved ``PruneConfig.forward_dtype``: see
    ``resolve_forward_dtype``), each linear input rounded once however many layers read it (the
    ``linears.SharedInputCasts`` yielded); or the model's own precision, its float32 linear layers by the
    host's faster product (``host.float32_linears``), yielding None. Either way causal self-attention runs
    by the native kernel where it measured faster (``host.native_attention``), and on the CPU the
    elementwise steps of ``module`` (the block or model the forwards run through) by the fused kernels
    (``fused.fused_block_steps``)."""
    steps = fused_steps_on(device, module)
    if forward_dtype is None:
        with steps, float32_linears(device), native_attention(device, None):
            yield None
        return
    autocast = torch.autocast(device.type, dtype=getattr(torch, forward_dtype))
    with steps, autocast, SharedInputCasts() as casts, native_attention(device, forward_dtype):
        yield casts


def resolve_forward_dtype(config: PruneConfig, model_dtype: torch.dtype, device: torch.device) -> str | None:
    """The autocast precision for the block forwards of ``config``, or None for the model's own.

    "auto" becomes "bfloat16" only where that was measured to keep the accuracy and is faster, on a float32
    model where bf16 products measure fast (``host.fast_bfloat16``): unstructured SparseGPT without
    quantization, and Wanda (50% and 2:4). At 2:4 bf16 forwards cost SparseGPT measurable perplexity on
    smollm2-135m (docs/RESULTS.md, "bf16 forwards"), so SparseGPT's N:M patterns and quantization keep the
    model's precision."""
    if config.forward_dtype == "auto":
        sparsegpt = config.method == "sparsegpt" and config.pattern is None
        measured = (sparsegpt or config.method == "wanda") and config.bits is None
        return "bfloat16" if measured and model_dtype == torch.float32 and fast_bfloat16(device) else None
    return None if config.forward_dtype == "none" else config.forward_dtype


def observe_block(
    block: Block,
    weights: list[LinearWeight],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    device: torch.device,
    full: bool = True,
    outputs: list[torch.Tensor] | None = None,
    forward_dtype: str | None = None,
) -> dict[str, InputStatistics]:
    """Run ``block`` over every batch (``hidden[b]`` with ``calls[b]``) and return its weights' input statistics
    (full Gram matrices, or only column norms when ``full`` is False); the block's outputs are appended to
    ``outputs`` when given. ``forward_dtype``: see ``forward_precision``; the Gram matrices are then summed
    from inputs rounded to it, as the layers see them."""
    operands = getattr(torch, forward_dtype) if forward_dtype is not None else None
    # without ``outputs`` nothing after the last weight's input is needed (see LinearInputObserver)
    with forward_precision(forward_dtype, device, block.module) as casts:
        observer = LinearInputObserver(weights, device, full, operands, stop_early=outputs is None, casts=casts)
        with observer:  # the observer sees each F.linear first
            for states, call in zip(hidden, calls):
                observer.next_batch()
                try:
                    output = call.run(block.module, states)
                except _StopForward:
                    continue
                _check_finite(output, f"in {block.name} (dense)")
                if outputs is not None:
                    outputs.append(output.to(states.dtype))
    return observer.statistics


def owl_plan(
    plan: list[tuple[Block, list[tuple[LinearWeight, float]]]],
    hidden: list[torch.Tensor],
    calls: list[list[BlockCall]],
    device: torch.device,
    config: PruneConfig,
    ranks: Ranks | None = None,
) -> list[tuple[Block, list[tuple[LinearWeight, float]]]]:
    """``plan`` with OWL's sparsities: one dense pass over the blocks counts each block's outlier weights."""
    ratios = []
    for index, (block, chosen) in enumerate(plan):
        outputs: list[torch.Tensor] = []
        weights = [weight for weight, _ in chosen]
        statistics = observe_block(block, weights, hidden, calls[index], device, False, outputs, config.forward_dtype)
        if ranks is not None:
            ranks.check_statistics_names(list(statistics))
            ranks.sum_statistics(statistics)
        outliers = total = 0
        for weight, _ in chosen:
            matrix = weight.matrix()
            total += matrix.numel()
            if weight.name in statistics:
                norms = statistics[weight.name].column_norms()
                outliers += outlier_count(matrix, norms, config.owl_outlier)
        ratios.append(outliers / total if total else 0.0)
        hidden = outputs
    sizes = [[weight.matrix().numel() for weight, _ in chosen] for _, chosen in plan]
    counts = owl_counts(ratios, sizes, [[sparsity for _, sparsity in chosen] for _, chosen in plan], config.owl_lambda)
    log.info("OWL outlier ratios per block: %s", ", ".join(f"{ratio:.4f}" for ratio in ratios))
    return [
        (block, [(weight, count / size) for (weight, _), count, size in zip(chosen, block_counts, block_sizes)])
        for (block, chosen), block_counts, block_sizes in zip(plan, counts, sizes)
    ]


def advance_block(
    block: Block, hidden: list[torch.Tensor], calls: list[BlockCall], forward_dtype: str | None = None
) -> None:
    """Replace each batch's hidden states, in place, by ``block``'s outputs (the next block's inputs)."""
    parameter = next(block.module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with forward_precision(forward_dtype, device, block.module):  # one context: autocast casts each weight once
        for batch, (states, call) in enumerate(zip(hidden, calls)):
            output = call.run(block.module, states)
            # the next block gets its inputs in the precision they came in
            hidden[batch] = output.to(states.dtype)
            _check_finite(hidden[batch], f"after pruning {block.name}")


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | None = None,
    progress: bool = False,
    ranks: Ranks | None = None,
) -> list[LayerRecord]:
    """Prune ``model`` in place, block by block; ``calibration`` holds token windows (nsamples, seqlen).

    Returns one record per pruned weight. Magnitude pruning needs no calibration. With ``ranks`` (see
    ``sparsegpt.distributed``) every process calls this with the same model and windows and works on its
    share; all end with the same pruned model.
    """
    model.eval()
    check_finite_weights(model)
    prefer_eager_experts(model)
    plan = _selected(find_blocks(model), config)
    records: list[LayerRecord] = []
    if not config.needs_calibration:
        for block, chosen in tqdm(plan, desc="pruning blocks", disable=not progress):
            records.extend(prune_block(block, chosen, [], [], torch.device("cpu"), config, False, ranks))
        return records
    if calibration is None:
        raise SparseGPTError(f"{config.method} needs calibration data")
    parameter = next(model.parameters())
    device = parameter.device
    config = replace(config, forward_dtype=resolve_forward_dtype(config, parameter.dtype, device))
    batches = list(calibration.to(device).split(config.batch_size))
    if ranks is not None:
        batches = ranks.share(batches)
    hidden, calls = capture_block_inputs(model, [block for block, _ in plan], batches)
    if config.allocation == "owl":
        plan = owl_plan(plan, hidden, calls, device, config, ranks)
    for index, (block, chosen) in enumerate(tqdm(plan, desc="pruning blocks", disable=not progress)):
        # the last block's outputs feed nothing that is pruned
        advance = index < len(plan) - 1
        records.extend(prune_block(block, chosen, hidden, calls[index], device, config, advance, ranks))
    return records


def prune_block(
    block: Block,
    chosen: list[tuple[LinearWeight, float]],
    hidden: Any,
    calls: list[BlockCall],
    device: torch.device,
    config: PruneConfig,
    advance: bool,
    ranks: Ranks | None = None,
) -> list[LayerRecord]:
    """One step of the sweep: observe ``block``'s inputs over every batch, prune its ``chosen`` weights,
    then (with ``advance``) replace ``hidden`` by the pruned block's outputs; ``config.forward_dtype`` is
    the resolved one (``resolve_forward_dtype``, as ``prune_model`` does). With ``ranks``, the batches
    are this process's share: statistics are summed over processes and the solves divided among them."""
    weights = [weight for weight, _ in chosen]
    statistics = {}
    if calls:
        statistics = observe_block(
            block, weights, hidden, calls, device, config.needs_hessian, forward_dtype=config.forward_dtype
        )
    if ranks is not None and calls:
        ranks.check_statistics_names(list(statistics))
        ranks.sum_statistics(statistics)
    solved: dict[int, LayerRecord] = {}
    factors: dict[int, InverseFactor] = {}
    for position, (weight, sparsity) in enumerate(chosen):
        # popped, so that statistics no later weight reads are given up to the solve and then freed
        stats = statistics.pop(weight.name, None)
        last = stats is not None and all(other is not stats for other in statistics.values())
        if ranks is None or ranks.owner(position) == ranks.rank:
            solved[position] = _solve(weight, sparsity, config, stats, last, factors)
        del stats
    records = []
    for position, (weight, _) in enumerate(chosen):
        if ranks is not None:  # every process solved its share; now each weight comes from its solver
            owner = ranks.owner(position)
            solved[position] = ranks.broadcast_object(solved.get(position), owner)
            weight_now = ranks.broadcast_tensor(weight.matrix(), owner)
            if owner != ranks.rank:
                weight.write(weight_now)
        records.append(solved[position])
    if advance:  # the next block reads what this one computes as it will run: S + BA where fitted
        with low_rank_hooks(block.module, low_rank_factors(records), block.name):
            advance_block(block, hidden, calls, config.forward_dtype)
    return records
