"""The one place for pruning settings and their defaults (the paper's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver import NMPattern
from sparsegpt.solver.quant import QuantGrid

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune.

    ``pattern`` (N:M) replaces ``sparsity`` by N/M. ``overrides`` are (glob on the layer name, sparsity)
    pairs, the last match winning; a sparsity of ``None`` skips the layer. ``bits`` quantizes the kept
    weights jointly (SparseGPT only; with sparsity 0 this is GPTQ), on grids per row and ``group_size``
    inputs (None = the whole row), ``symmetric`` or not.
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

    @property
    def target_sparsity(self) -> float:
        return self.pattern.sparsity if self.pattern is not None else self.sparsity

    @property
    def grid(self) -> QuantGrid | None:
        return QuantGrid(self.bits, self.group_size, self.symmetric) if self.bits is not None else None

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    @property
    def needs_hessian(self) -> bool:
        """Whether the full XᵀX is needed; Wanda needs only its diagonal."""
        return self.method == "sparsegpt"

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
