"""Input statistics of a linear layer: the Hessian H = 2·XᵀX / n of its reconstruction loss, or only its
diagonal (the squared input norms that Wanda needs, at a fraction of the cost)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsegpt.solver.gram import add_gram, mirror_gram, native_column_squares, triangle_edges

# rows squared and summed per chunk: a chunk's float32 squares stay in the cache, where a whole batch's
# (tokens × width) go to memory and back
SQUARES_CHUNK = 256


def add_column_squares(squares: torch.Tensor, rows: torch.Tensor) -> None:
    """``squares += (rows²).sum(dim=0)`` with the squares formed in ``squares``' precision: in one pass by
    the native kernel where it takes them (float32 sums; ``gram.native_column_squares``), else by torch."""
    if native_column_squares(squares, rows):
        return
    for chunk in rows.split(SQUARES_CHUNK):
        squares.add_(chunk.to(squares.dtype).square().sum(dim=0))


@dataclass
class InputStatistics:
    """Running Gram matrix XᵀX over the rows x (tokens) that a linear layer reads, in fp32 (or fp64).
    Only its upper triangle is summed (``gram.add_gram``); ``hessian`` returns the whole matrix.

    With ``full=False`` only diag(XᵀX) is kept: ``column_norms`` works, ``hessian`` does not. With
    ``operands`` (torch.bfloat16 or torch.float16) the inputs are rounded to that precision first, as a
    layer running in it rounds them, and their products are summed in ``dtype`` (``gram.add_gram``).
    ``backend``: which of ``gram.BACKENDS`` sums the Gram matrix on the CPU (the host's faster one).
    """

    width: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    full: bool = True
    operands: torch.dtype | None = None
    backend: str = "mkl"
    tokens: int = 0
    gram: torch.Tensor | None = field(init=False, default=None)
    squares: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.full:
            self.gram = torch.zeros(self.width, self.width, dtype=self.dtype, device=self.device)
        else:
            self.squares = torch.zeros(self.width, dtype=self.dtype, device=self.device)

    def add(self, inputs: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Accumulate ``inputs`` of shape (..., width); ``token_mask`` (shape ``inputs.shape[:-1]``,
        True = real token) excludes padding positions."""
        rows = inputs.reshape(-1, self.width)
        if token_mask is not None:
            rows = rows[token_mask.reshape(-1).to(torch.bool)]
        rows = rows.to(self.operands if self.operands is not None else self.dtype)
        if self.gram is not None:
            add_gram(self.gram, rows, self._edges(), self.backend)
        else:
            assert self.squares is not None
            add_column_squares(self.squares, rows)
        self.tokens += rows.shape[0]

    def _edges(self) -> list[int]:
        """The column blocks ``add_gram`` sums the Gram matrix in (by the precision it multiplies in)."""
        return triangle_edges(self.width, self.operands if self.operands is not None else self.dtype)

    def hessian(self) -> torch.Tensor:
        """H = 2·XᵀX / n, shape (width, width). All zeros when no token was seen."""
        if self.gram is None:
            raise ValueError("these statistics hold only column norms (full=False), not the Hessian")
        return mirror_gram(self.gram * (2.0 / max(self.tokens, 1)), self._edges())

    def take_hessian(self) -> torch.Tensor:
        """``hessian()`` computed in place of the Gram matrix, which these statistics give up (the last
        reader saves a (width, width) copy)."""
        if self.gram is None:
            raise ValueError("these statistics hold no Gram matrix (full=False, or already taken)")
        gram, self.gram = self.gram, None
        return mirror_gram(gram.mul_(2.0 / max(self.tokens, 1)), self._edges())

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ for every input column j, shape (width,)."""
        squares = self.gram.diagonal() if self.gram is not None else self.squares
        assert squares is not None
        return squares.clamp_min(0).sqrt()
