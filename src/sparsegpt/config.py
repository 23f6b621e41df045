"""The one place for pruning settings and their defaults (the paper's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver import NMPattern
from sparsegpt.solver.lowrank import rank_for_budget
from sparsegpt.solver.quant import QuantGrid
from sparsegpt.solver.refine import MASK_SCORES

METHODS = ("sparsegpt", "wanda", "magnitude")
FORWARD_DTYPES = ("auto", "none", "bfloat16", "float16")
ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune.

    ``pattern`` (N:M) replaces ``sparsity`` by N/M. ``overrides`` are (glob on the layer name, sparsity)
    pairs, the last match winning; a sparsity of ``None`` skips the layer. ``bits`` quantizes the kept
    weights jointly (SparseGPT only; with sparsity 0 this is GPTQ), on grids per row and ``group_size``
    inputs (None = the whole row), ``symmetric`` or not.

    Beyond plain SparseGPT (all off by default): ``allocation="owl"`` moves each block's sparsity by its
    share of outlier weights (Yin et al. 2023: |W|·‖X‖ above ``owl_outlier`` × the layer mean; offsets
    spread over ±``owl_lambda``), keeping the model's total exactly; ``mask_score`` fixes the mask from
    Wanda's or RIA's saliency before the sweep instead of choosing it adaptively; ``repair`` rounds of
    prune-and-grow swaps and ``refine`` conjugate-gradient steps then lower each layer's error further.
    ``low_rank`` (a rank) or ``low_rank_budget`` (the share of each layer's parameter count its factors may
    take) adds a low-rank term BA to every pruned layer, fitted in closed form to its outputs
    (``solver.lowrank``), then ``low_rank_rounds`` rounds alternate between re-solving the kept weights
    and re-fitting BA; with ``low_rank_remask`` each round first prunes W − BA afresh by the method, so
    that the mask follows what the factors leave.

    ``forward_dtype`` ("bfloat16" or "float16") runs the calibration forward passes under autocast in that
    precision (matrix products in it, weights kept as they are); the Hessians are summed in float32 from
    the inputs as the layers multiply them, and solves stay in float32. "auto" (the default) picks bfloat16
    where it was measured to keep the accuracy: unstructured SparseGPT and Wanda on a float32 model, where
    bf16 products measure fast (CUDA with bf16; CPUs by a short measurement, ``host.fast_bfloat16``);
    elsewhere, and with "none" (or None), the forwards run in the model's own precision
    (``pipeline.resolve_forward_dtype``).
    """

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: NMPattern | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    damp: float = 0.01
    blocksize: int = 128
    batch_size: int = 8
    overrides: tuple[tuple[str, float | None], ...] = ()
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = False
    allocation: str = "uniform"
    owl_outlier: float = 5.0
    owl_lambda: float = 0.08
    mask_score: str = "sparsegpt"
    repair: int = 0
    refine: int = 0
    low_rank: int = 0
    low_rank_budget: float | None = None
    low_rank_rounds: int = 0
    low_rank_remask: bool = False
    forward_dtype: str | None = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SparseGPTError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits is not None:
            QuantGrid(self.bits, self.group_size, self.symmetric)  # validates both
            if self.method != "sparsegpt":
                raise SparseGPTError(f"quantization (bits) needs method sparsegpt, not {self.method}")
        elif self.group_size is not None or self.symmetric:
            raise SparseGPTError("a group size or symmetric grid needs bits")
        _check_sparsity(self.sparsity, "sparsity")
        self._check_options()
        for pattern, value in self.overrides:
            if value is not None:
                _check_sparsity(value, f"override {pattern}")
                if self.pattern is not None:
                    raise SparseGPTError(f"override {pattern}={value}: with an N:M pattern a layer can only be skipped")
        for name in ("nsamples", "seqlen", "blocksize", "batch_size"):
            if getattr(self, name) < 1:
                raise SparseGPTError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.damp >= 0:
            raise SparseGPTError(f"damp must be non-negative, got {self.damp}")
        if self.pattern is not None and self.blocksize % self.pattern.m:
            raise SparseGPTError(f"block size {self.blocksize} must be a multiple of M={self.pattern.m}")

    def _check_options(self) -> None:
        if self.forward_dtype is not None and self.forward_dtype not in FORWARD_DTYPES:
            raise SparseGPTError(
                f"unknown forward dtype {self.forward_dtype!r}; choose one of {', '.join(FORWARD_DTYPES)}"
            )
        if self.allocation not in ALLOCATIONS:
            raise SparseGPTError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.mask_score not in MASK_SCORES:
            raise SparseGPTError(f"unknown mask score {self.mask_score!r}; choose one of {', '.join(MASK_SCORES)}")
        for name in ("repair", "refine", "low_rank", "low_rank_rounds"):
            if getattr(self, name) < 0:
                raise SparseGPTError(f"{name} must be a non-negative integer, got {getattr(self, name)}")
        solver_options = {
            "--mask-score": self.mask_score != "sparsegpt",
            "--repair": self.repair > 0,
            "--refine": self.refine > 0,
        }
        for option, used in solver_options.items():
            if used and self.method != "sparsegpt":
                raise SparseGPTError(
                    f"{option} works on SparseGPT's Hessian; it needs method sparsegpt, not {self.method}"
                )
        if self.bits is not None and (self.repair or self.refine):
            raise SparseGPTError("--repair and --refine move kept weights off the quantization grid; drop --bits")
        self._check_low_rank()
        if self.allocation == "owl":
            if self.pattern is not None:
                raise SparseGPTError("--allocation owl sets a sparsity per block; an N:M pattern fixes it at N/M")
            if self.method == "magnitude":
                raise SparseGPTError("--allocation owl scores weights by their inputs; magnitude uses no calibration")
            if not self.owl_outlier > 0 or not 0 <= self.owl_lambda < 1:
                raise SparseGPTError("OWL needs an outlier threshold > 0 and a lambda in [0, 1)")

    def _check_low_rank(self) -> None:
        if self.low_rank_budget is not None:
            if self.low_rank:
                raise SparseGPTError("give a low-rank rank or a low-rank budget, not both")
            if not 0 < self.low_rank_budget < 1:
                raise SparseGPTError(f"the low-rank budget must be in (0, 1), got {self.low_rank_budget}")
        if self.low_rank_rounds and not self.uses_low_rank:
            raise SparseGPTError("--low-rank-rounds alternate with the low-rank term; give --low-rank or a budget")
        if self.low_rank_remask and not self.low_rank_rounds:
            raise SparseGPTError(
                "--low-rank-remask re-chooses the mask in the alternating rounds; give --low-rank-rounds"
            )
        if self.low_rank_rounds and self.bits is not None:
            raise SparseGPTError("--low-rank-rounds move kept weights off the quantization grid; drop --bits")

    @property
    def uses_low_rank(self) -> bool:
        return self.low_rank > 0 or self.low_rank_budget is not None

    def rank_for(self, rows: int, cols: int) -> int:
        """The rank of the low-rank term of a (rows, cols) layer (0: none)."""
        if self.low_rank_budget is not None:
            return rank_for_budget(rows, cols, self.low_rank_budget)
        return min(self.low_rank, rows, cols)

    @property
    def target_sparsity(self) -> float:
        return self.pattern.sparsity if self.pattern is not None else self.sparsity

    @property
    def grid(self) -> QuantGrid | None:
        return QuantGrid(self.bits, self.group_size, self.symmetric) if self.bits is not None else None

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.uses_low_rank

    @property
    def needs_hessian(self) -> bool:
        """Whether the full XᵀX is needed; Wanda needs only its diagonal (unless a low-rank term is fitted)."""
        return self.method == "sparsegpt" or self.uses_low_rank

    def sparsity_for(self, layer: str) -> float | None:
        """The sparsity of one layer, or None when it is skipped."""
        sparsity: float | None = self.target_sparsity
        for pattern, value in self.overrides:
            if fnmatchcase(layer, pattern):
                sparsity = value
        return sparsity

    def to_dict(self) -> dict:
        settings = asdict(self)
        settings["pattern"] = str(self.pattern) if self.pattern else None
        settings["overrides"] = [list(pair) for pair in self.overrides]
        return settings


def _check_sparsity(value: float, what: str) -> None:
    if not 0 <= value < 1:
        raise SparseGPTError(f"{what} must be in [0, 1), got {value}")


def parse_override(text: str) -> tuple[str, float | None]:
    """``PATTERN=SPARSITY`` or ``PATTERN=skip``, e.g. ``*.mlp.down_proj=0.3``."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise SparseGPTError(f"override must look like PATTERN=SPARSITY or PATTERN=skip, got {text!r}")
    if value == "skip":
        return pattern, None
    try:
        return pattern, float(value)
    except ValueError:
        raise SparseGPTError(f"override {text!r}: {value!r} is neither a number nor 'skip'") from None


DEFAULT_REFINE = 100
"""Conjugate-gradient steps that a ``+refine`` variant runs when no ``refine`` count is given."""
DEFAULT_REPAIR = 64
"""Prune-and-grow rounds that a ``+repair`` variant runs when no ``repair`` count is given."""
DEFAULT_LOW_RANK = 16
"""The rank that a ``+lowrank`` variant fits when neither a rank nor a budget is given (on smollm2-135m
about 4.6% of the decoder's linear parameters)."""
VARIANT_EXTRAS = ("owl", "refine", "repair", "wanda", "ria", "lowrank")


def variant(config: PruneConfig, name: str) -> PruneConfig:
    """The config of a method variant: ``METHOD[+EXTRA...]`` with extras owl (allocation), refine, repair,
    wanda or ria (the mask score) and lowrank (the low-rank term), e.g. ``sparsegpt+owl+refine``.
    ``config`` supplies everything else, and the counts of ``refine`` and ``repair``, the rank or budget
    and the rounds of ``lowrank``, when it sets them."""
    method, *extras = name.split("+")
    changes: dict = {
        "method": method,
        "allocation": "uniform",
        "mask_score": "sparsegpt",
        "refine": 0,
        "repair": 0,
        "low_rank": 0,
        "low_rank_budget": None,
        "low_rank_rounds": 0,
        "low_rank_remask": False,
    }
    for extra in extras:
        if extra == "owl":
            changes["allocation"] = "owl"
        elif extra == "refine":
            changes["refine"] = config.refine or DEFAULT_REFINE
        elif extra == "repair":
            changes["repair"] = config.repair or DEFAULT_REPAIR
        elif extra in ("wanda", "ria"):
            changes["mask_score"] = extra
        elif extra == "lowrank":
            changes["low_rank_budget"] = config.low_rank_budget
            changes["low_rank"] = 0 if config.low_rank_budget is not None else config.low_rank or DEFAULT_LOW_RANK
            changes["low_rank_rounds"] = config.low_rank_rounds
            changes["low_rank_remask"] = config.low_rank_remask
        else:
            raise SparseGPTError(f"{name}: unknown extra {extra!r}; variants add {', '.join(VARIANT_EXTRAS)}")
    return replace(config, **changes)


def level(config: PruneConfig, text: str) -> PruneConfig:
    """``config`` at a sparsity level: ``0.7`` (unstructured) or ``2:4`` (N:M)."""
    if ":" in text:
        return replace(config, pattern=NMPattern.parse(text))
    try:
        return replace(config, sparsity=float(text), pattern=None)
    except ValueError:
        raise SparseGPTError(f"a sparsity level is a share like 0.7 or a pattern like 2:4, got {text!r}") from None
