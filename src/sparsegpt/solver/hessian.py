"""Input statistics of a linear layer: the Hessian H = 2·XᵀX / n of its reconstruction loss, or only its
diagonal (the squared input norms that Wanda needs, at a fraction of the cost)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStatistics:
    """Running Gram matrix XᵀX over the rows x (tokens) that a linear layer reads, in fp32 (or fp64).

    With ``full=False`` only diag(XᵀX) is kept: ``column_norms`` works, ``hessian`` does not.
    """

    width: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    full: bool = True
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
        rows = rows.to(self.dtype)
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)
        else:
            assert self.squares is not None
            self.squares.add_(rows.square().sum(dim=0))
        self.tokens += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2·XᵀX / n, shape (width, width). All zeros when no token was seen."""
        if self.gram is None:
            raise ValueError("these statistics hold only column norms (full=False), not the Hessian")
        return self.gram * (2.0 / max(self.tokens, 1))

    def take_hessian(self) -> torch.Tensor:
        """``hessian()`` computed in place of the Gram matrix, which these statistics give up (the last
        reader saves a (width, width) copy)."""
        if self.gram is None:
            raise ValueError("these statistics hold no Gram matrix (full=False, or already taken)")
        gram, self.gram = self.gram, None
        return gram.mul_(2.0 / max(self.tokens, 1))

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ for every input column j, shape (width,)."""
        squares = self.gram.diagonal() if self.gram is not None else self.squares
        assert squares is not None
        return squares.clamp_min(0).sqrt()
