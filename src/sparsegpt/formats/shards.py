"""Plain safetensors files and the shard index of a transformers folder, read and written by hand.

The ``safetensors`` package reads by memory-mapping a file (which counts as resident memory while it is
mapped) and writes by serializing the whole file in memory first. Streaming a model block by block needs
neither: tensors are read one at a time with plain file reads, and written tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsegpt.errors import SparseGPTError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The data offset and the tensor entries of a safetensors file, checked against its size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        raise SparseGPTError(f"{path.name}: unreadable safetensors file ({error})") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = DTYPES.get(entry["dtype"])
        count = math.prod(entry["shape"])
        if dtype is None or end - begin != count * itemsize(dtype) or 8 + length + end > size:
            raise SparseGPTError(f"{path.name}: tensor {name} is truncated or malformed")
    return 8 + length, header


def read_tensor(path: Path, start: int, name: str, entry: dict[str, Any]) -> torch.Tensor:
    """One tensor of a safetensors file whose header (``read_header``: data offset ``start``, ``entry``)
    is known, read into fresh memory."""
    tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    with path.open("rb") as handle:
        handle.seek(start + entry["data_offsets"][0])
        if handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != size:
            raise SparseGPTError(f"{path.name}: tensor {name} is truncated")
    return tensor


def read_rows(
    path: Path, start: int, name: str, entry: dict[str, Any], rows: torch.Tensor, band_bytes: int = 32 * 2**20
) -> torch.Tensor:
    """Rows ``rows`` (sorted, distinct indices along the first dimension) of one tensor of a safetensors
    file, read band by band: never more than ``band_bytes`` of the rest of the tensor in memory."""
    shape, dtype = entry["shape"], DTYPES[entry["dtype"]]
    row_bytes = itemsize(dtype) * math.prod(shape[1:])
    out = torch.empty((len(rows), *shape[1:]), dtype=dtype)
    band_rows = max(1, band_bytes // max(row_bytes, 1))
    with path.open("rb") as handle:
        for first in range(0, shape[0], band_rows):
            wanted = slice(*torch.searchsorted(rows, torch.tensor([first, first + band_rows])).tolist())
            if wanted.start == wanted.stop:
                continue
            low, high = int(rows[wanted.start]), int(rows[wanted.stop - 1]) + 1
            band = torch.empty((high - low, *shape[1:]), dtype=dtype)
            handle.seek(start + entry["data_offsets"][0] + low * row_bytes)
            if handle.readinto(memoryview(band.reshape(-1).view(torch.uint8).numpy())) != band.numel() * itemsize(
                dtype
            ):
                raise SparseGPTError(f"{path.name}: tensor {name} is truncated")
            out[wanted] = band[rows[wanted] - low]
    return out


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read (not mapped)."""
    start, header = read_header(path)
    return {name: read_tensor(path, start, name, entry) for name, entry in header.items()}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to be written that is read only when its turn comes (``read()``), so that a file of many
    large tensors never holds more than one of them in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def write_safetensors(tensors: Mapping[str, torch.Tensor | LazyTensor], path: Path) -> None:
    """A safetensors file written tensor by tensor (no serialized copy of the whole file in memory); a
    ``LazyTensor`` is read as it is written."""
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        size = math.prod(tensor.shape) * itemsize(tensor.dtype)
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, tensor in tensors.items():
            real = tensor.read() if isinstance(tensor, LazyTensor) else tensor
            if real.dtype != tensor.dtype or tuple(real.shape) != tuple(tensor.shape):
                raise SparseGPTError(f"{name}: read as {real.dtype} {list(real.shape)}, announced otherwise")
            flat = real.detach().to("cpu").contiguous().reshape(-1)
            handle.write(memoryview(flat.view(torch.uint8).numpy()))
            del real, flat


def save_durably(tensors: Mapping[str, torch.Tensor | LazyTensor], path: Path) -> None:
    """Write a safetensors file through a temporary name, flushed to disk before it takes its name."""
    temporary = path.with_name(f".{path.name}.tmp")
    write_safetensors(tensors, temporary)
    _fsync(temporary)
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
