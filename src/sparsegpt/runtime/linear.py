"""A pruned weight held in its compact encoding, and the linear layer that multiplies with it.

``PackedWeight`` keeps what the compact format stores for one matrix (docs/FORMAT.md): a bitmask of the
kept entries (N:M in-group positions are turned into the bitmask they stand for, which for 2:4 takes the
same bytes), the kept values or their quantization codes with per-group scales and zero points, plus
one integer per row, where the row's kept entries start. ``SparseLinear`` computes y = x·Ŵᵀ + b from
it: a few tokens at a time straight from the encoding (the native kernel reads 1.125 bytes per weight at
50% bf16 where a dense bf16 layer reads 2), many at a time through a dense copy decoded into a scratch
buffer and multiplied by torch.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.compact import POSITIONS_ERROR, Layout, StoredTensor, pack_bits, scatter_kept, unpack_mask
from sparsegpt.runtime import kernels

DECODE_TOKENS = 8
"""Up to this many tokens in one call go through the sparse product; more through a decoded dense copy."""


@dataclass(eq=False)
class PackedWeight:
    """A (rows, cols) weight matrix Ŵ in compact form.

    ``mask``: uint8, rows·cols bits row-major (1 = kept), or None when every entry is kept;
    ``offsets``: int64 (rows + 1,), the index of each row's first kept entry; ``values``: the kept entries
    in ``dtype``, or ``codes`` (a stream of ``bits``-bit integers) with float16 ``scales`` and uint8
    ``zeros`` of shape (rows, ⌈cols / group⌉). ``dtype`` is the dtype the weight decodes to.
    """

    rows: int
    cols: int
    dtype: torch.dtype
    offsets: torch.Tensor
    mask: torch.Tensor | None = None
    values: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    bits: int = 0
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group: int = 0

    def __post_init__(self) -> None:
        native = kernels.library()
        self._matrix = self._native_matrix() if native is not None else None
        self.isa = kernels.best_isa()
        # asked once per instruction set: each call costs a few microseconds, and a token makes hundreds
        self._takes_bfloat16 = {
            isa: bool(native.sgpt_takes_bfloat16(ctypes.byref(self._matrix), isa)) for isa in kernels.available_isas()
        }

    @classmethod
    def from_stored(cls, stored: StoredTensor) -> PackedWeight:
        """The packed form of a checked compact entry (``bitmask``, ``nm`` or ``full``)."""
        rows, cols, name = stored.rows, stored.cols, stored.name
        if stored.encoding not in ("bitmask", "nm", "full"):
            raise SparseGPTError(f"{name}: a {stored.encoding} tensor is not sparse")
        if stored.dtype not in kernels.KINDS:
            raise SparseGPTError(
                f"{name}: the sparse runtime holds float32, bfloat16 or float16 weights, not {stored.dtype}"
            )
        mask = stored.mask
        if stored.encoding == "nm":
            mask = _nm_mask(stored)
            per_row = stored.kept // rows if rows else 0
            offsets = torch.arange(rows + 1, dtype=torch.int64) * per_row
        elif mask is not None:
            offsets = row_offsets(mask, rows, cols)
            if int(offsets[-1]) != stored.kept:
                raise SparseGPTError(
                    f"{name}: the mask marks {int(offsets[-1])} kept weights, the entry says {stored.kept}"
                )
        else:
            offsets = torch.arange(rows + 1, dtype=torch.int64) * cols
        grid = stored.grid
        if grid is None:
            return cls(rows, cols, stored.dtype, offsets, mask, values=stored.values.contiguous())
        assert stored.scales is not None and stored.zeros is not None and stored.codes is not None
        if not bool(torch.isfinite(stored.scales).all()):
            raise SparseGPTError(f"{name}: its quantization scales are not all finite")
        return cls(
            rows, cols, stored.dtype, offsets, mask, codes=stored.codes.contiguous(), bits=grid.bits,
            scales=stored.scales.contiguous(), zeros=stored.zeros.contiguous(), group=grid.group(cols),
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes held: the encoding plus the row offsets."""
        parts = (self.offsets, self.mask, self.values, self.codes, self.scales, self.zeros)
        return sum(part.numel() * part.element_size() for part in parts if part is not None)

    def _native_matrix(self) -> kernels.Matrix:
        def address(tensor: torch.Tensor | None) -> int | None:
            return None if tensor is None else tensor.data_ptr()

        ngroups = 0 if self.scales is None else self.scales.shape[1]
        return kernels.Matrix(
            self.rows, self.cols, int(self.offsets[-1]), address(self.mask),
            0 if self.mask is None else self.mask.numel(), address(self.offsets),
            kernels.CODES if self.codes is not None else kernels.KINDS[self.dtype], kernels.KINDS.get(self.dtype, 0),
            address(self.values), address(self.codes), 0 if self.codes is None else self.codes.numel(),
            self.bits, address(self.scales), address(self.zeros), self.group, ngroups,
        )  # fmt: skip

    def matvec(self, inputs: torch.Tensor, isa: int | None = None, threads: int | None = None) -> torch.Tensor:
        """inputs (n, cols) of any float dtype → inputs·Ŵᵀ (n, rows) float32, from the encoding (native
        kernel), the products exact and summed in float32."""
        if self._matrix is None:
            return inputs.float() @ self.dense(torch.float32).T
        isa = self.isa if isa is None else isa
        bf16 = inputs.dtype == torch.bfloat16 and self._takes_bfloat16.get(isa, False)
        inputs = inputs.contiguous() if bf16 else inputs.float().contiguous()
        out = torch.empty(inputs.shape[0], self.rows, dtype=torch.float32)
        threads = torch.get_num_threads() if threads is None else threads
        kind = kernels.KINDS[inputs.dtype]
        for start in range(0, inputs.shape[0], kernels.MAX_VECTORS):
            count = min(kernels.MAX_VECTORS, inputs.shape[0] - start)
            status = kernels.library().sgpt_matvec(
                self._matrix, count, inputs.data_ptr() + start * self.cols * inputs.element_size(), kind,
                out.data_ptr() + start * self.rows * 4, isa, threads,
            )  # fmt: skip
            if status:
                raise SparseGPTError(f"the sparse kernel refused the call (code {status})")
        return out

    def densify(
        self, first: int, last: int, dtype: torch.dtype, out: torch.Tensor | None = None, isa: int | None = None
    ) -> torch.Tensor:
        """Rows [first, last) of Ŵ as a dense (last − first, cols) tensor of ``dtype`` (into ``out``)."""
        if out is None:
            out = torch.empty(last - first, self.cols, dtype=dtype)
        if self._matrix is None:
            return out.copy_(self.dense(dtype)[first:last])
        status = kernels.library().sgpt_densify(
            ctypes.byref(self._matrix), first, last, kernels.KINDS[dtype], out.data_ptr(),
            self.isa if isa is None else isa, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise SparseGPTError(f"the sparse kernel refused the call (code {status})")
        return out

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ decoded with torch alone (rows, cols), by the compact reader's own numpy/torch path: the
        reference the kernels are checked against, and the fallback where they are not built."""
        mask = None if self.mask is None else unpack_mask(self.mask, self.rows * self.cols).view(self.rows, self.cols)
        quantized = None if self.codes is None else (self.codes, self.bits, self.scales, self.zeros, self.group)
        target = torch.empty(self.rows, self.cols, dtype=self.dtype)
        matrix = scatter_kept(Layout(self.rows, self.cols, mask=mask), target, self.values, quantized)
        return matrix if dtype is None else matrix.to(dtype)


def row_offsets(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows + 1,) int64: the kept entries before each row of a packed row-major bitmask."""
    offsets = torch.empty(rows + 1, dtype=torch.int64)
    native = kernels.library()
    if native is not None:
        mask = mask.contiguous()
        native.sgpt_row_offsets(mask.data_ptr(), mask.numel(), rows, cols, offsets.data_ptr())
        return offsets
    counts = unpack_mask(mask, rows * cols).view(rows, cols).sum(dim=1)
    offsets[0] = 0
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def _nm_mask(stored: StoredTensor) -> torch.Tensor:
    """The packed bitmask of an N:M tensor's kept entries, from its in-group positions (checked)."""
    assert stored.pattern is not None and stored.positions is not None
    native = kernels.library()
    if native is not None:  # in one pass, without the torch path's temporaries (8 bytes per kept weight)
        n, m = stored.pattern
        mask = torch.zeros((stored.rows * stored.cols + 7) // 8, dtype=torch.uint8)
        positions = stored.positions.contiguous()
        status = native.sgpt_nm_mask(
            positions.data_ptr(), positions.numel(), stored.rows, stored.cols, m, m - n, mask.data_ptr()
        )
        if status == POSITIONS_ERROR:
            raise SparseGPTError(f"{stored.name}: in-group positions are out of range or not strictly increasing")
        if status:
            raise SparseGPTError(f"{stored.name}: the sparse kernel refused its N:M pattern (code {status})")
        return mask
    layout = stored.layout()
    assert layout.positions is not None
    groups = torch.zeros(stored.rows, stored.cols // layout.m, layout.m, dtype=torch.bool)
    groups.scatter_(2, layout.positions.long(), True)
    return pack_bits(groups.reshape(-1), 1)


class Scratch:
    """One reusable buffer for the dense copy a layer decodes into before a product with many tokens;
    the sparse modules of a model share one, so it holds one layer (the largest) at any moment. A model
    runs one forward at a time."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def matrix(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, cols) view of the buffer, grown where it is smaller."""
        if self.buffer.dtype != dtype or self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols, dtype=dtype)
        return self.buffer[: rows * cols].view(rows, cols)


class SparseLinear(nn.Module):
    """y = x·Ŵᵀ + b with Ŵ a ``PackedWeight``: a drop-in for ``nn.Linear`` (and GPT-2's ``Conv1D``, whose
    matrix view is the same) at inference. Activations of any float dtype; the products accumulate in
    float32 and the result has the input's dtype, as a dense layer's would.

    Up to ``DECODE_TOKENS`` tokens are multiplied straight from the encoding. More are multiplied densely
    by torch, after decoding Ŵ into ``scratch`` (shared by a model's sparse modules), in one product: the
    decoding is paid once per layer however many tokens share it (docs/RESULTS.md, "Sparse inference",
    has the prefill figures)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, scratch: Scratch | None = None) -> None:
        super().__init__()
        self.weight_packed = weight
        self.in_features, self.out_features = weight.cols, weight.rows
        self.bias = None if bias is None else nn.Parameter(bias)
        self.scratch = scratch if scratch is not None else Scratch()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # a state dict without the weight would save a model that loads with random weights
        raise SparseGPTError(
            "a model on the sparse runtime has no dense weights to save; save or copy the folder it was "
            "loaded from, or load it with runtime='dense'"
        )

    def extra_repr(self) -> str:
        kept = int(self.weight_packed.offsets[-1])
        share = kept / max(1, self.in_features * self.out_features)
        codes = f", {self.weight_packed.bits}-bit codes" if self.weight_packed.codes is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={share:.1%}{codes}"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.requires_grad and torch.is_grad_enabled():
            raise SparseGPTError(
                "sparse modules are for inference only (no gradients flow through them): run the model under "
                "torch.no_grad() or torch.inference_mode()"
            )
        flat = inputs.reshape(-1, self.in_features)
        weight = self.weight_packed
        if flat.shape[0] <= DECODE_TOKENS:
            out = weight.matvec(flat)
            if self.bias is not None:  # added before rounding to the inputs' dtype, as a dense layer does
                out += self.bias
            out = out.to(inputs.dtype)
        else:
            dense = weight.densify(
                0, weight.rows, flat.dtype, out=self.scratch.matrix(weight.rows, weight.cols, flat.dtype)
            )
            out = F.linear(flat, dense, self.bias)
        return out.view(*inputs.shape[:-1], self.out_features)
