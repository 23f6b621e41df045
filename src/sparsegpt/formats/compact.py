"""The compact checkpoint (docs/FORMAT.md, versions 1 and 2): pruned weights as kept values plus a packed mask.

A sparse weight is stored as the values it keeps (in its dtype, or as packed integer codes with float16
scales and uint8 zero points when it was quantized) and where they are: a bitmask, or for N:M tensors the
in-group positions of the kept values. Every other tensor is stored as it is. ``pack_folder`` and
``unpack_folder`` convert between a transformers folder and a compact one, tensor for tensor bit-exactly;
``load_pretrained`` turns either into a transformers model, decoding one tensor at a time.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:  # ISA-L's CRC-32 (the same checksum as zlib's) runs about 9x faster here, which loading feels
    from isal.isal_zlib import crc32 as _CRC32
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback where it cannot install
    from zlib import crc32 as _CRC32

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.adapter import ADAPTER_FOLDER, has_adapter
from sparsegpt.formats.atomic import write_folder_atomically, write_json_atomically
from sparsegpt.formats.shards import INDEX_NAME, SINGLE_NAME, itemsize, read_header, read_tensor
from sparsegpt.models import CheckpointNames, config_dtype, read_config
from sparsegpt.report import REPORT_NAME
from sparsegpt.solver.quant import QuantGrid, dequantize, dequantize_groups, group_views, quantize

FORMAT_NAME = "sparsegpt-compact"
FORMAT_VERSION = 2
"""Written when the folder holds low-rank terms (``formats.adapter``); otherwise version 1."""
READABLE_VERSIONS = (1, 2)
MANIFEST = "sparsegpt_compact.json"
QUANT_SIDECAR = "sparsegpt_quant.safetensors"
"""In a plain folder: the grids (scales, zero points) of quantized weights, so that pack can store codes."""
NM_CANDIDATES = ((2, 4), (4, 8))


@dataclass
class QuantSpec:
    """The grid of one quantized weight, over its matrix view (see ``matrix_view``)."""

    grid: QuantGrid
    scales: torch.Tensor  # float16 (rows, groups)
    zeros: torch.Tensor  # uint8 (rows, groups)
    transposed: bool = False


# --- bit streams -------------------------------------------------------------------------------------


@functools.cache
def _bit_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Row v holds the 8 bits of byte value v, least significant first; and the powers of two."""
    table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.uint8)
    return table, 2.0 ** torch.arange(8)


def unpack_mask(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of a ``pack_bits`` stream of one-bit values, as booleans."""
    bits = np.unpackbits(packed.contiguous().numpy().reshape(-1), count=count, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers below 2^bits as one little-endian bit stream: value i occupies bits
    [i·bits, (i+1)·bits), bit k of the stream is bit k % 8 of byte k // 8. Returns uint8 bytes."""
    table, powers = _bit_table()
    stream = table.index_select(0, values.reshape(-1).int())[:, :bits].reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    # each byte is the dot product of its 8 bits with the powers of two (exact in float32)
    return (stream.view(-1, 8).float() @ powers).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` values of a ``pack_bits`` stream, as uint8."""
    if 8 % bits == 0:  # whole values per byte: value j of a byte is (byte >> j·bits) & mask, one numpy pass each
        stream = packed.contiguous().numpy().reshape(-1)
        values = np.empty((stream.size, 8 // bits), dtype=np.uint8)
        for j in range(8 // bits):
            np.bitwise_and(np.right_shift(stream, j * bits), (1 << bits) - 1, out=values[:, j])
        return torch.from_numpy(values.reshape(-1)[:count])
    table, powers = _bit_table()
    stream = table.index_select(0, packed.reshape(-1).int()).reshape(-1)[: count * bits]
    return (stream.view(count, bits).float() @ powers[:bits]).to(torch.uint8)


def index_bits(m: int) -> int:
    """Bits per in-group position of an N:M tensor: ceil(log2 M)."""
    return max(1, math.ceil(math.log2(m)))


# --- one tensor --------------------------------------------------------------------------------------


def matrix_view(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (rows, cols) matrix a tensor is encoded as: its last dim as columns, or its transpose."""
    if transposed:
        return tensor.T
    return tensor.reshape(-1, tensor.shape[-1])


def _integer_view(tensor: torch.Tensor) -> torch.Tensor:
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """True where an entry's bit pattern is not all zeros (so -0.0 counts as kept: packing is bit-exact)."""
    return _integer_view(tensor) != 0 if tensor.is_floating_point() else tensor != 0


def same_bits(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0 and compares NaNs by payload)."""
    if first.dtype != second.dtype or first.shape != second.shape:
        return False
    if not first.is_floating_point():
        return torch.equal(first, second)
    return torch.equal(_integer_view(first), _integer_view(second))


@dataclass
class Layout:
    """Which entries of a (rows, cols) matrix are kept, in row-major order: all of them, those a boolean
    mask marks, or for N:M the ``positions`` (rows, cols // m, m - n) inside each group of ``m``."""

    rows: int
    cols: int
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    m: int = 0

    @property
    def count(self) -> int:
        """How many entries are kept."""
        if self.mask is not None:
            return int(torch.count_nonzero(self.mask))
        return self.positions.numel() if self.positions is not None else self.rows * self.cols

    @functools.cached_property
    def targets(self) -> torch.Tensor | None:
        """Row-major flat indices of the kept entries (None when all are kept)."""
        if self.mask is not None:
            # numpy's flatnonzero plus a fancy assignment beat torch's nonzero and masked_scatter_ here
            return torch.from_numpy(np.flatnonzero(self.mask.contiguous().numpy().reshape(-1)))
        if self.positions is not None:
            starts = torch.arange(0, self.rows * self.cols, self.m).view(self.rows, -1, 1)
            return (self.positions + starts).reshape(-1)
        return None

    def gather(self, matrix: torch.Tensor) -> torch.Tensor:
        """The kept entries of ``matrix`` (rows, cols), in order."""
        flat = matrix.reshape(-1)
        return flat if self.targets is None else flat.index_select(0, self.targets)

    def place(self, values: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Write ``values`` at the kept entries of ``matrix`` (a contiguous (rows, cols) matrix of the values'
        dtype), leaving the other entries as they are; returns ``matrix``."""
        if self.targets is None:
            return matrix.copy_(values.view(self.rows, self.cols))
        assert matrix.is_contiguous() and matrix.dtype == values.dtype
        # on integer views: scatter_ moves bit patterns (and was the fastest placement measured here)
        _integer_view(matrix).view(-1).scatter_(0, self.targets, _integer_view(values))
        return matrix

    def scatter(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A (rows, cols) matrix holding ``values`` at the kept entries and zeros elsewhere, written into
        ``out`` (a contiguous matrix of the values' dtype) when given."""
        if self.targets is None and out is None:
            return values.view(self.rows, self.cols)
        matrix = out if out is not None else torch.empty(self.rows, self.cols, dtype=values.dtype)
        if self.targets is not None:
            matrix.zero_()
        return self.place(values, matrix)


def _per_entry(table: torch.Tensor, group: int, layout: Layout) -> torch.Tensor:
    """A (rows, groups) table of per-group numbers, read off at every kept entry, as float32."""
    return layout.gather(table.float().repeat_interleave(group, dim=1)[:, : layout.cols])


def _nm_valid(kept: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = kept.shape
    return cols % m == 0 and bool((kept.reshape(rows, cols // m, m).sum(dim=2) <= m - n).all())


def _codes(name: str, matrix: torch.Tensor, layout: Layout, quant: QuantSpec) -> torch.Tensor:
    """Integer codes of the kept entries; checks that they reproduce the stored values bit for bit."""
    group = quant.grid.group(layout.cols)
    expected = (layout.rows, quant.grid.groups(layout.cols))
    if tuple(quant.scales.shape) != expected or tuple(quant.zeros.shape) != expected:
        raise SparseGPTError(f"{name}: its quantization grid is {list(quant.scales.shape)}, expected {list(expected)}")
    scale, zero = _per_entry(quant.scales, group, layout), _per_entry(quant.zeros, group, layout)
    values = layout.gather(matrix)
    stored = _integer_view(values)

    def reproduces(candidates: torch.Tensor) -> torch.Tensor:
        return _integer_view(dequantize(candidates, scale, zero).to(values.dtype)) == stored

    codes = quantize(values.float(), scale, zero, quant.grid.max_code)
    found = reproduces(codes)
    # In a 16-bit tensor a grid finer than the format's spacing (8-bit codes and bf16 weights) has grid
    # points that round to the same stored value, and a stored value whose nearest grid point is not the
    # one it was rounded from; its code is then a neighbour: |v| ≤ 255·s keeps bf16's rounding of v
    # within about one step s of its grid point, so two steps either way always suffice.
    for step in (1, -1, 2, -2):
        if found.all():
            break
        candidates = (codes + step).clamp_(0, quant.grid.max_code)
        better = reproduces(candidates).logical_and_(found.logical_not())
        codes = torch.where(better, candidates, codes)
        found.logical_or_(better)
    if not found.all():
        raise SparseGPTError(f"{name}: the weights are not on the quantization grid recorded for them")
    return codes.to(torch.uint8)


def encode_tensor(
    name: str, tensor: torch.Tensor, quant: QuantSpec | None = None, patterns: tuple = NM_CANDIDATES
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest entry and the stored parts of one tensor.

    A tensor that satisfies one of the N:M ``patterns`` (along its rows, or for 2-D tensors its columns)
    stores the kept values' in-group positions plus the values, unless storing every entry is smaller.
    Otherwise the smaller of: every entry (plain values, or for a quantized tensor one code per entry:
    "full"), and a bitmask plus the kept (nonzero) values. A quantized tensor always stores codes.
    """
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if quant is None and (not tensor.is_floating_point() or tensor.ndim < 2 or tensor.numel() == 0):
        return {**entry, "encoding": "plain"}, {name: tensor}
    if quant is not None and quant.transposed and tensor.ndim != 2:
        raise SparseGPTError(f"{name}: only 2-D tensors can be quantized along their first dimension")
    orientations = [quant.transposed] if quant is not None else [False, True] if tensor.ndim == 2 else [False]
    value_bits = quant.grid.bits if quant is not None else 8 * itemsize(tensor.dtype)
    best: tuple[float, str, bool, tuple[int, int] | None] = (
        math.ceil(tensor.numel() * value_bits / 8),
        "plain" if quant is None else "full",
        orientations[0],
        None,
    )
    nonzero = nonzero_bits(tensor)
    kept_count = int(nonzero.sum())
    bitmask = math.ceil(tensor.numel() / 8) + math.ceil(kept_count * value_bits / 8)
    if bitmask < best[0]:
        best = (bitmask, "bitmask", orientations[0], None)
    # an N:M tensor keeps its pattern explicit, even where a bitmask would be slightly smaller
    everything = best[1] in ("plain", "full")
    candidates = []
    for transposed in orientations:
        kept = matrix_view(nonzero, transposed)
        rows, cols = kept.shape
        for n, m in patterns:
            if _nm_valid(kept, n, m):
                size = math.ceil(rows * cols // m * (m - n) * value_bits / 8)
                size += math.ceil(rows * cols // m * (m - n) * index_bits(m) / 8)
                candidates.append((size, "nm", transposed, (n, m)))
    if candidates:
        smallest = min(candidates, key=lambda candidate: candidate[0])
        if not everything or smallest[0] < best[0]:
            best = smallest
    _, encoding, transposed, pattern = best
    if encoding == "plain":
        return {**entry, "encoding": "plain"}, {name: tensor}
    matrix = matrix_view(tensor, transposed)
    rows, cols = matrix.shape
    entry.update(encoding=encoding, transposed=transposed)
    parts: dict[str, torch.Tensor] = {}
    if encoding == "full":
        layout = Layout(rows, cols)
    elif encoding == "bitmask":
        layout = Layout(rows, cols, mask=matrix_view(nonzero, transposed))
        parts[f"{name}::mask"] = pack_bits(layout.mask, 1)
    else:
        assert pattern is not None
        n, m = pattern
        entry.update(n=n, m=m)
        groups = matrix_view(nonzero, transposed).reshape(rows, cols // m, m)
        # the kept positions of each group: its nonzeros, then zeros to fill up to M - N, ascending
        order = torch.argsort((~groups).to(torch.int8), dim=2, stable=True)[:, :, : m - n]
        layout = Layout(rows, cols, positions=order.sort(dim=2).values, m=m)
        parts[f"{name}::positions"] = pack_bits(layout.positions, index_bits(m))
    if quant is None:
        parts[f"{name}::values"] = layout.gather(matrix).contiguous()
    else:
        entry["quant"] = {
            "bits": quant.grid.bits,
            "group_size": quant.grid.group_size,
            "symmetric": quant.grid.symmetric,
        }
        parts[f"{name}::codes"] = pack_bits(_codes(name, matrix, layout, quant), quant.grid.bits)
        parts[f"{name}::scales"] = quant.scales.to(torch.float16).contiguous()
        parts[f"{name}::zeros"] = quant.zeros.to(torch.uint8).contiguous()
    entry["kept"] = layout.count
    return entry, parts


def _entry_grid(entry: dict[str, Any]) -> QuantGrid | None:
    """The quantization grid a manifest entry names, or None."""
    quant = entry.get("quant")
    return QuantGrid(int(quant["bits"]), quant["group_size"], bool(quant["symmetric"])) if quant else None


def _expect(name: str, part: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise SparseGPTError(
            f"{name}: part {part} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}"
        )


@dataclass
class StoredTensor:
    """One tensor's manifest entry and parts, read and checked against each other (not yet decoded).

    The matrix is (rows, cols) (see ``matrix_view``); ``mask`` is set for ``bitmask``, ``positions`` and
    ``pattern`` (n, m) for ``nm``; ``values`` for unquantized tensors, ``codes``/``scales``/``zeros`` and
    ``grid`` for quantized ones. ``plain`` entries hold their tensor in ``values``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    encoding: str
    transposed: bool = False
    rows: int = 0
    cols: int = 0
    kept: int = 0
    grid: QuantGrid | None = None
    pattern: tuple[int, int] | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    values: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    def layout(self) -> Layout:
        """The checked Layout of the kept entries (the numpy/torch reader's view)."""
        return _python_layout(self.name, self.rows, self.cols, self.mask, self.positions, self.pattern, self.kept)


def read_stored(name: str, entry: dict[str, Any], read: Callable[[str], torch.Tensor]) -> StoredTensor:
    """The parts of tensor ``name`` as its manifest ``entry`` describes them; ``read(key)`` returns a part.
    Refuses a malformed entry, or a part whose dtype or shape differs from what the entry implies."""
    try:
        shape = tuple(int(size) for size in entry["shape"])
        dtype = getattr(torch, entry["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {entry['dtype']!r}")
        encoding = entry["encoding"]
        if encoding == "plain":
            tensor = read(name)
            _expect(name, "data", tensor, shape, dtype)
            return StoredTensor(name, shape, dtype, encoding, values=tensor)
        transposed = bool(entry["transposed"])
        kept_count = int(entry["kept"])
        grid = _entry_grid(entry)
        pattern = (int(entry["n"]), int(entry["m"])) if encoding == "nm" else None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SparseGPTError(f"{name}: malformed manifest entry ({error!r})") from None
    if transposed and len(shape) != 2:
        raise SparseGPTError(f"{name}: only 2-D tensors can be stored transposed")
    rows, cols = (shape[1], shape[0]) if transposed else (math.prod(shape[:-1]), shape[-1])
    stored = StoredTensor(name, shape, dtype, encoding, transposed, rows, cols, kept_count, grid, pattern)
    if encoding == "full":
        if grid is None or kept_count != rows * cols:
            raise SparseGPTError(f"{name}: a full entry must be quantized and keep all {rows * cols} weights")
    elif encoding == "bitmask":
        stored.mask = read(f"{name}::mask")
        _expect(name, "mask", stored.mask, (math.ceil(rows * cols / 8),), torch.uint8)
    elif pattern is not None:
        n, m = pattern
        if not 0 < n < m or cols % m:
            raise SparseGPTError(f"{name}: N:M pattern {n}:{m} does not fit {cols} columns")
        count = rows * (cols // m) * (m - n)
        if count != kept_count:
            raise SparseGPTError(
                f"{name}: an {n}:{m} tensor of this shape keeps {count} weights, the entry says {kept_count}"
            )
        stored.positions = read(f"{name}::positions")
        _expect(name, "positions", stored.positions, (math.ceil(count * index_bits(m) / 8),), torch.uint8)
    else:
        raise SparseGPTError(f"{name}: unknown encoding {encoding!r}")
    try:
        if grid is None:
            stored.values = read(f"{name}::values")
            _expect(name, "values", stored.values, (kept_count,), dtype)
        else:
            stored.codes = read(f"{name}::codes")
            _expect(name, "codes", stored.codes, (math.ceil(kept_count * grid.bits / 8),), torch.uint8)
            stored.scales = read(f"{name}::scales")
            _expect(name, "scales", stored.scales, (rows, grid.groups(cols)), torch.float16)
            stored.zeros = read(f"{name}::zeros")
            _expect(name, "zeros", stored.zeros, (rows, grid.groups(cols)), torch.uint8)
    except SparseGPTError:
        if stored.mask is not None:  # say so where the mask is what disagrees with the entry
            _python_layout(name, rows, cols, stored.mask, None, None, kept_count)
        raise
    return stored


def decode_tensor(
    name: str,
    entry: dict[str, Any],
    read: Callable[[str], torch.Tensor],
    out: torch.Tensor | None = None,
    native: bool = True,
    vector: bool = True,
) -> torch.Tensor:
    """Rebuild one tensor from its manifest entry; ``read(key)`` returns a stored part.

    With ``out`` (a tensor of the entry's shape) the result is written there, saving a copy when its dtype
    and layout allow decoding in place. ``native`` uses the C kernel where it is built (one pass), with
    its AVX-512 loops where the processor has them and ``vector`` allows them; ``native=False`` forces the
    numpy/torch reader. All give the same bits.
    """
    return decode_stored(read_stored(name, entry, read), out, native, vector)


def decode_stored(
    stored: StoredTensor, out: torch.Tensor | None = None, native: bool = True, vector: bool = True
) -> torch.Tensor:
    """``decode_tensor`` for parts already read and checked (``read_stored``)."""
    name, shape, dtype, encoding, transposed = (
        stored.name,
        stored.shape,
        stored.dtype,
        stored.encoding,
        stored.transposed,
    )
    if out is not None and tuple(out.shape) != shape:
        raise SparseGPTError(f"{name}: shape {list(shape)} does not match the model's {list(out.shape)}")
    if encoding == "plain":
        assert stored.values is not None
        return out.copy_(stored.values) if out is not None else stored.values
    rows, cols, kept_count, grid, pattern = stored.rows, stored.cols, stored.kept, stored.grid, stored.pattern
    mask_part, positions_part, values = stored.mask, stored.positions, stored.values
    codes, scales, zeros = stored.codes, stored.scales, stored.zeros
    # decode straight into ``out`` where it has the stored dtype and layout
    direct = out is not None and not transposed and out.dtype == dtype and out.is_contiguous()
    target = out.view(rows, cols) if direct else torch.empty(rows, cols, dtype=dtype)
    kernel = _kernel() if native else None
    if kernel is not None and (grid is None or (dtype in _OUT_KINDS and bool(torch.isfinite(scales).all()))):
        parts = (mask_part, positions_part, values, codes, scales, zeros)
        mask_part, positions_part, values, codes, scales, zeros = (_contiguous(part) for part in parts)
        marked = kernel.sgpt_decode(
            rows, cols, _LAYOUTS[encoding], _pointer(mask_part), _pointer(positions_part),
            0 if positions_part is None else positions_part.numel(), pattern[1] if pattern else 0,
            pattern[1] - pattern[0] if pattern else 0, kept_count, _pointer(values),
            target.element_size(), _pointer(codes), 0 if codes is None else codes.numel(),
            grid.bits if grid else 0, _pointer(scales), _pointer(zeros), grid.group(cols) if grid else 0,
            grid.groups(cols) if grid else 0, _OUT_KINDS.get(dtype, 0), vector, target.data_ptr(),
        )  # fmt: skip
        if marked == POSITIONS_ERROR:
            raise SparseGPTError(f"{name}: in-group positions are out of range or not strictly increasing")
        if marked < 0:
            raise SparseGPTError(f"{name}: the native decoder refused this entry (code {marked})")
        if marked != kept_count:
            raise SparseGPTError(f"{name}: the mask marks {marked} kept weights, the entry says {kept_count}")
        matrix = target
    else:
        quantized = None if grid is None else (codes, grid.bits, scales, zeros, grid.group(cols))
        matrix = scatter_kept(stored.layout(), target, values, quantized)
    if direct:
        return out
    tensor = matrix.T.contiguous() if transposed else matrix.reshape(shape)
    return out.copy_(tensor) if out is not None else tensor


def scatter_kept(
    layout: Layout,
    target: torch.Tensor,
    values: torch.Tensor | None = None,
    quantized: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """The (rows, cols) matrix ``target`` (contiguous, of the weight's dtype) holding the kept entries of
    ``layout``, zeros elsewhere: the stored ``values``, or the ``quantized`` (codes stream, bits, scales,
    zeros, group) dequantized. The numpy/torch reader, which the native kernels are checked against."""
    if quantized is None:
        return layout.scatter(values, target)
    codes, bits, scales, zeros, group = quantized
    # Dequantize densely (a few cheap passes over the whole matrix beat per-entry scale lookups): pruned
    # entries hold their group's zero point, so they come out as (z − z)·s = +0.0, as stored.
    dense_codes = torch.empty(layout.rows, layout.cols, dtype=torch.uint8)
    for view, which in group_views(dense_codes, group):
        view.copy_(zeros[:, which, None].expand_as(view))
    layout.place(unpack_bits(codes, bits, layout.count), dense_codes)
    return target.copy_(dequantize_groups(dense_codes, scales, zeros, group))


def _python_layout(
    name: str,
    rows: int,
    cols: int,
    mask_part: torch.Tensor | None,
    positions_part: torch.Tensor | None,
    pattern: tuple[int, int] | None,
    kept_count: int,
) -> Layout:
    """The checked Layout of a stored tensor from its mask or positions part (the numpy/torch reader)."""
    if mask_part is not None:
        layout = Layout(rows, cols, mask=unpack_mask(mask_part, rows * cols).view(rows, cols))
        if layout.count != kept_count:
            raise SparseGPTError(f"{name}: the mask marks {layout.count} kept weights, the entry says {kept_count}")
        return layout
    if positions_part is not None and pattern is not None:
        n, m = pattern
        positions = unpack_bits(positions_part, index_bits(m), kept_count).view(rows, cols // m, m - n).long()
        if (positions >= m).any() or (positions.diff(dim=2) <= 0).any():
            raise SparseGPTError(f"{name}: in-group positions are out of range or not strictly increasing")
        return Layout(rows, cols, positions=positions, m=m)
    return Layout(rows, cols)


# --- the native kernel (_cdecode.c) -----------------------------------------------------------------

_LAYOUTS = {"full": 0, "bitmask": 1, "nm": 2}
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
POSITIONS_ERROR = -1
"""What the native kernels return for invalid N:M positions (ERROR_POSITIONS in _encoding.h)."""


@functools.cache
def _kernel() -> Any:
    """The native decoding library, or None where the optional extension was not built (then the
    numpy/torch reader decodes, bit for bit the same)."""
    try:
        from sparsegpt.formats import _cdecode
    except ImportError:
        return None
    library = ctypes.CDLL(_cdecode.__file__)
    integer, pointer = ctypes.c_int64, ctypes.c_void_p
    library.sgpt_decode.restype = integer
    library.sgpt_decode.argtypes = [integer, integer, ctypes.c_int32, pointer, pointer, integer, integer, integer]
    library.sgpt_decode.argtypes += [integer, pointer, integer, pointer, integer, integer, pointer, pointer]
    library.sgpt_decode.argtypes += [integer, integer, ctypes.c_int32, ctypes.c_int32, pointer]
    library.sgpt_round.restype = None
    library.sgpt_round.argtypes = [pointer, pointer, integer, ctypes.c_int32]
    return library


def native_decoding() -> bool:
    """Whether the native decoding kernel is available (it is optional; see pyproject.toml)."""
    return _kernel() is not None


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


def _pointer(tensor: torch.Tensor | None) -> int | None:
    """The address the kernel reads ``tensor`` at (which must be contiguous, and stay alive for the call)."""
    return None if tensor is None else tensor.data_ptr()


def part_bytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes the parts take in a safetensors file (without the header)."""
    return sum(part.numel() * part.element_size() for part in parts.values())


def _crc32(tensor: torch.Tensor) -> int:
    return _CRC32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


# --- folders -----------------------------------------------------------------------------------------


def is_compact(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def dense_files(folder: Path) -> list[Path]:
    """The safetensors files of a plain folder (its shards, in order)."""
    index = folder / INDEX_NAME
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(mapping.values()))]
    single = folder / SINGLE_NAME
    if not single.is_file():
        raise SparseGPTError(f"{folder} has no {SINGLE_NAME} (or {INDEX_NAME}) to pack")
    return [single]


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SparseGPTError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
        raise SparseGPTError(f"{path.name}: unreadable safetensors file ({error})") from None


def read_quant_sidecar(folder: Path) -> dict[str, QuantSpec]:
    """The grids recorded next to a plain folder's weights (empty when none were quantized)."""
    path = folder / QUANT_SIDECAR
    if not path.is_file():
        return {}
    specs = {}
    with _open_safetensors(path) as handle:
        grids = json.loads((handle.metadata() or {}).get("grids", "{}"))
        for name, grid in grids.items():
            specs[name] = QuantSpec(
                QuantGrid(grid["bits"], grid["group_size"], grid["symmetric"]),
                handle.get_tensor(f"{name}::scales"),
                handle.get_tensor(f"{name}::zeros"),
                bool(grid["transposed"]),
            )
    return specs


def write_quant_sidecar(folder: Path, specs: dict[str, QuantSpec]) -> None:
    """Record the grids of quantized weights next to a plain folder's weights."""
    from safetensors.torch import save_file

    if not specs:
        return
    tensors, grids = {}, {}
    for name, spec in specs.items():
        tensors[f"{name}::scales"] = spec.scales.to(torch.float16).contiguous()
        tensors[f"{name}::zeros"] = spec.zeros.to(torch.uint8).contiguous()
        grids[name] = {
            "bits": spec.grid.bits,
            "group_size": spec.grid.group_size,
            "symmetric": spec.grid.symmetric,
            "transposed": spec.transposed,
        }
    save_file(tensors, str(folder / QUANT_SIDECAR), metadata={"format": "sparsegpt-quant", "grids": json.dumps(grids)})


def _copy_other_files(source: Path, target: Path, skip: set[str]) -> None:
    for path in source.iterdir():
        if path.name in skip or path.name.startswith("."):
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def _report_pattern(folder: Path) -> tuple[int, int] | None:
    """The N:M pattern a sparsegpt report in ``folder`` names, if any."""
    try:
        text = json.loads((folder / REPORT_NAME).read_text())["pattern"]
        n, m = (int(part) for part in text.split(":"))
        return n, m
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def nm_patterns(folder: Path) -> tuple[tuple[int, int], ...]:
    """The N:M patterns to try storing tensors in: 2:4, 4:8 and the pattern a sparsegpt report names."""
    reported = _report_pattern(folder)
    return NM_CANDIDATES if reported is None or reported in NM_CANDIDATES else (reported, *NM_CANDIDATES)


def pack_into(source: Path, target: Path) -> dict[str, Any]:
    """Write the compact form of the plain folder ``source`` into the (empty) folder ``target``.

    N:M storage is tried for 2:4, 4:8 and the pattern named by a sparsegpt report in ``source``.
    Reads one tensor at a time; returns the manifest.
    """
    from safetensors.torch import save_file

    patterns = nm_patterns(source)
    files = dense_files(source)
    quant = read_quant_sidecar(source)
    # version 1 where it suffices, so that readers of version 1 keep reading folders without low-rank terms
    version = FORMAT_VERSION if has_adapter(source) else 1
    manifest: dict[str, Any] = {"format": FORMAT_NAME, "version": version, "files": [], "tensors": {}}
    if has_adapter(source):
        manifest["low_rank"] = ADAPTER_FOLDER
    if (source / INDEX_NAME).is_file():
        manifest["index"] = json.loads((source / INDEX_NAME).read_text())
    for number, path in enumerate(files, start=1):
        compact_name = f"compact-{number:05d}-of-{len(files):05d}.safetensors"
        parts: dict[str, torch.Tensor] = {}
        with _open_safetensors(path) as handle:
            metadata = handle.metadata() or {}
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                entry, tensor_parts = encode_tensor(name, handle.get_tensor(name), quant.pop(name, None), patterns)
                entry["file"] = compact_name
                entry["crc32"] = {key: _crc32(part) for key, part in tensor_parts.items()}
                entry["bytes"] = part_bytes(tensor_parts)
                manifest["tensors"][name] = entry
                parts.update(tensor_parts)
        save_file(parts, str(target / compact_name), metadata={"format": FORMAT_NAME})
        manifest["files"].append({"name": compact_name, "source": path.name, "metadata": metadata})
    if quant:
        raise SparseGPTError(f"{QUANT_SIDECAR} names tensors the checkpoint lacks: {', '.join(sorted(quant))}")
    _copy_other_files(source, target, {path.name for path in files} | {INDEX_NAME, QUANT_SIDECAR})
    write_json_atomically(target / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a compact folder, checked for format and version."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SparseGPTError(f"{folder / MANIFEST}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SparseGPTError(f"{folder / MANIFEST}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise SparseGPTError(
            f"{folder}: compact format version {manifest.get('version')!r} is not supported"
            f" (this reader knows {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if manifest.get("low_rank", ADAPTER_FOLDER) != ADAPTER_FOLDER or (
        manifest.get("version") == 2 and not has_adapter(folder)
    ):
        raise SparseGPTError(f"{folder}: the manifest names low-rank terms the folder lacks ({ADAPTER_FOLDER}/)")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("files"), list):
        raise SparseGPTError(f"{folder / MANIFEST}: malformed manifest (no tensors or files)")
    return manifest


def manifest_entries(
    folder: Path, manifest: dict[str, Any]
) -> list[tuple[str, dict[str, Any], Callable[[str], torch.Tensor]]]:
    """(name, entry, read) for every tensor of a compact folder; ``read(key)`` returns a part checked
    against its CRC (from any thread). Parts are read with plain file reads into fresh memory, not mapped:
    a mapped file counts as resident memory for as long as it is mapped."""
    headers: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    entries = []
    for name, entry in manifest["tensors"].items():
        file_name = str(entry.get("file"))
        if file_name not in headers:
            path = folder / file_name
            if not path.is_file():
                raise SparseGPTError(f"{folder}: file {file_name} named in the manifest is missing")
            headers[file_name] = (path, *read_header(path))
        entries.append((name, entry, _checked_reader(*headers[file_name], file_name, name, entry)))
    return entries


def _checked_reader(
    path: Path, start: int, header: dict[str, Any], file_name: str, name: str, entry: dict[str, Any]
) -> Callable[[str], torch.Tensor]:
    """Reads the parts of tensor ``name`` from a data file, each checked against the manifest's CRC32."""
    checksums = entry.get("crc32") or {}

    def read(key: str) -> torch.Tensor:
        if key not in header:
            raise SparseGPTError(f"{name}: part {key} is missing from {file_name}")
        part = read_tensor(path, start, key, header[key])
        if key not in checksums or _crc32(part) != checksums[key]:
            raise SparseGPTError(f"{name}: part {key} is corrupted (CRC32 mismatch)")
        return part

    return read


def unpack_into(source: Path, target: Path) -> None:
    """Write the plain transformers form of the compact folder ``source`` into ``target``."""
    from safetensors.torch import save_file

    manifest = read_manifest(source)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    specs: dict[str, QuantSpec] = {}
    for name, entry, read in manifest_entries(source, manifest):
        stored = read_stored(name, entry, read)
        tensors.setdefault(entry["file"], {})[name] = decode_stored(stored)
        if stored.grid is not None:
            assert stored.scales is not None and stored.zeros is not None
            specs[name] = QuantSpec(stored.grid, stored.scales, stored.zeros, stored.transposed)
    for file_info in manifest["files"]:
        save_file(tensors.get(file_info["name"], {}), str(target / file_info["source"]), metadata=file_info["metadata"])
    if "index" in manifest:
        write_json_atomically(target / INDEX_NAME, manifest["index"])
    write_quant_sidecar(target, specs)
    compact_files = {file_info["name"] for file_info in manifest["files"]}
    _copy_other_files(source, target, compact_files | {MANIFEST})


def pack_folder(source: str | Path, target: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Convert a plain transformers folder into a compact one, atomically. Returns the manifest."""
    source, target = Path(source), Path(target)
    if is_compact(source):
        raise SparseGPTError(f"{source} is already a compact folder")
    result: dict[str, Any] = {}
    write_folder_atomically(target, lambda build: result.update(pack_into(source, build)), overwrite)
    return result


def unpack_folder(source: str | Path, target: str | Path, overwrite: bool = False) -> None:
    """Convert a compact folder back into a plain transformers folder, atomically."""
    source, target = Path(source), Path(target)
    if not is_compact(source):
        raise SparseGPTError(f"{source} is not a compact folder (no {MANIFEST})")
    write_folder_atomically(target, lambda build: unpack_into(source, build), overwrite)


def load_compact(folder: Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """A transformers model from a compact folder, decoded tensor by tensor into a model built without
    initialisation (peak memory: the dense model plus one tensor's parts, or one group of tensors that
    transformers merges on load, such as a layer's experts)."""
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(folder)
    config = read_config(folder)
    dtype = config_dtype(config, dtype)
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    loaded = set()
    _decode_all(folder, manifest, CheckpointNames(model, manifest["tensors"]), state, loaded, torch.get_num_threads())
    model.tie_weights()

    state = model.state_dict()
    pointers = {state[name].data_ptr() for name in loaded}
    missing = [name for name in state if name not in loaded and state[name].data_ptr() not in pointers]
    if missing:
        raise SparseGPTError(f"the compact folder lacks tensor {missing[0]} (and {len(missing) - 1} more)")
    return model.eval()


def _decode_all(
    folder: Path,
    manifest: dict[str, Any],
    names: CheckpointNames,
    state: dict[str, torch.Tensor],
    loaded: set[str],
    workers: int,
) -> None:
    # Tensors decode independently (torch, numpy and zlib release the GIL): one worker per core, each
    # single-threaded. OpenMP's thread count is per thread, so each worker sets its own; otherwise every
    # worker would run a team of its own and they would fight over the cores.
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    members: dict[str, tuple[dict[str, Any], Callable[[str], torch.Tensor]]] = {}
    with pool:
        jobs = []
        for key, entry, read in manifest_entries(folder, manifest):
            name = names.name(key)
            if name is None:  # merged with others on load: decoded when its group is
                members[key] = (entry, read)
                continue
            if name not in state:
                raise SparseGPTError(f"{key}: the compact folder holds a tensor the model does not have")
            jobs.append(pool.submit(_decode_into, key, entry, read, state[name]))
            loaded.add(name)
        try:
            for job in jobs:
                job.result()
        finally:
            for job in jobs:
                job.cancel()
    for group in dict.fromkeys(names.group_of_key(key) for key in members):
        for name, tensor in names.convert(group, lambda key: decode_tensor(key, *members.pop(key))).items():
            if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                raise SparseGPTError(f"{group}: the compact folder's tensors make a {name} the model does not have")
            with torch.no_grad():
                state[name].copy_(tensor)
            loaded.add(name)


def _decode_into(name: str, entry: dict[str, Any], read: Callable[[str], torch.Tensor], out: torch.Tensor) -> None:
    with torch.no_grad():
        decode_tensor(name, entry, read, out=out)


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip random initialisation of weights that are about to be overwritten."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
    with no_init_weights():
        yield
