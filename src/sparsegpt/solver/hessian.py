"""Input statistics of a linear layer: the Hessian H = 2·XᵀX / n of its reconstruction loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStatistics:
    """Running Gram matrix XᵀX over the rows x (tokens) that a linear layer reads, in fp32 (or fp64)."""

    width: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    tokens: int = 0
    gram: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.width, self.width, dtype=self.dtype, device=self.device)

    def add(self, inputs: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Accumulate ``inputs`` of shape (..., width); ``token_mask`` (shape ``inputs.shape[:-1]``,
        True = real token) excludes padding positions."""
        rows = inputs.reshape(-1, self.width)
        if token_mask is not None:
            rows = rows[token_mask.reshape(-1).to(torch.bool)]
        rows = rows.to(self.dtype)
        self.gram.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2·XᵀX / n, shape (width, width). All zeros when no token was seen."""
        return self.gram * (2.0 / max(self.tokens, 1))

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ for every input column j, shape (width,)."""
        return self.gram.diagonal().clamp_min(0).sqrt()
