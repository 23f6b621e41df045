"""GGUF checkpoints converted into plain transformers folders one tensor at a time.

transformers' own GGUF loader dequantizes every tensor into memory before it builds the model (a 7B GGUF
becomes 28 GB of float32). Here the ``gguf`` package reads the file's tensor table (no tensor data), and
each tensor's bytes are read with a plain file read (a memory-mapped file would count as resident
memory), dequantized by ``gguf``'s dequantizer, renamed and reshaped by transformers' own GGUF tensor
processors and name map, and appended to a safetensors shard; the largest tensors (the embedding, the
output layer) go in pieces of rows. The config and tokenizer are transformers' readings of the file's
metadata. The folder holds float32 weights (the dequantized values exactly), sharded, with an index, so
that ``--stream`` reads it block by block like any other folder.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.shards import INDEX_NAME

log = logging.getLogger(__name__)

SHARD_BYTES = 2 << 30
"""A shard is closed once it holds this many bytes (a tensor is never split over two)."""
PIECE_BYTES = 32 << 20
"""Float32 bytes of the rows of a large tensor dequantized at once."""
HEADER_ENTRY_BYTES = 256
"""Header room reserved per tensor in each shard (names and shapes are written once the shard is full)."""


def convert_gguf(path: Path, out: Path, progress: bool = False) -> Path:
    """Write the transformers folder of the GGUF file ``path`` into ``out`` (a new folder, published whole
    once complete); returns ``out``."""
    from tqdm.auto import tqdm

    if out.exists():
        raise SparseGPTError(f"{out} exists already")
    # transformers' readings of the metadata, then the tensor table, one after the other: each parse of a
    # large vocabulary holds hundreds of MB while it runs
    config, tokenizer = _read_metadata(path)
    architecture, tensors = _tensor_table(path)
    names, processor, skeleton = _naming(config, architecture)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        writer = _ShardWriter(build, len(tensors))
        pending: dict[str, torch.Tensor] = {}  # what a processor assembles over several tensors (MoE experts)
        block = None
        with open(path, "rb") as source:
            for tensor in tqdm(tensors, desc="converting GGUF", unit="tensor", disable=not progress):
                if _block_of(tensor.name) != block:  # a block's merged tensors are complete at its end
                    writer.add_all(pending)
                    block = _block_of(tensor.name)
                _convert_tensor(source, tensor, names, processor, writer, pending)
        writer.add_all(pending)
        written = writer.close()
        missing = [name for name in skeleton if name not in written]
        if missing:
            raise SparseGPTError(f"{path.name}: the GGUF file has no tensor for {missing[0]}")
        for name, shape in written.items():
            if name in skeleton and skeleton[name] != shape:
                raise SparseGPTError(f"{path.name}: {name} has shape {list(shape)}, the model {list(skeleton[name])}")
        config.save_pretrained(build)
        tokenizer.save_pretrained(build)
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    out.chmod(0o755)
    return out


def gguf_folder(path: Path, cache: Path, progress: bool = False) -> Path:
    """The converted folder of a GGUF file under ``cache``, made on first use; keyed by the file's full
    path, size and modification time, so that a changed file is converted again."""
    if not path.is_file():
        raise SparseGPTError(f"no such GGUF file: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into a transformers folder (%s)", path.name, target)
    return convert_gguf(path, target, progress)


@dataclass(frozen=True)
class _StoredTensor:
    """Where one tensor of a GGUF file lies and how it is stored: ``raw_shape``/``raw_dtype`` as the gguf
    reader views its bytes (one row per output row), ``shape`` in GGUF's order (fastest dimension first)."""

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    raw_shape: tuple[int, ...]
    raw_dtype: np.dtype
    data_offset: int
    n_bytes: int


def _read_metadata(path: Path) -> tuple[Any, Any]:
    """transformers' config and tokenizer made from the file's metadata."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as error:
        raise SparseGPTError(f"cannot read GGUF file {path}: {_first_line(error)}") from error
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = path.stem
    config.dtype = torch.float32
    return config, tokenizer


def _tensor_table(path: Path) -> tuple[str, list[_StoredTensor]]:
    """The file's architecture name and where each of its tensors lies (the reader itself is dropped)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError) as error:
        raise SparseGPTError(f"cannot read GGUF file {path}: {_first_line(error)}") from error
    tensors = [
        _StoredTensor(
            str(tensor.name),
            tensor.tensor_type,
            tuple(int(size) for size in tensor.shape),
            tuple(tensor.data.shape),
            tensor.data.dtype,
            int(tensor.data_offset),
            int(tensor.n_bytes),
        )
        for tensor in reader.tensors
    ]
    architecture = read_field(reader, "general.architecture")[0]
    del reader
    gc.collect()
    return architecture, tensors


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _naming(config: Any, architecture: str) -> tuple[dict[str, str], Any, dict[str, tuple[int, ...]]]:
    """transformers' GGUF name -> state-dict name map and tensor processor for the file's architecture,
    and the shapes the model expects (of a skeleton built without weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.architectures = [type(skeleton).__name__]
    # the processors read head counts from transformers' names for them, which the config carries
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    tied = getattr(config, "tie_word_embeddings", False)
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in skeleton.state_dict().items()
        if not (tied and name == "lm_head.weight") and "rotary_emb" not in name
    }
    return names, processor, expected


def _block_of(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    return parts[1] if parts[0] == "blk" and len(parts) > 2 else None


def _read_raw(source: Any, tensor: _StoredTensor, first_row: int = 0, rows: int | None = None) -> np.ndarray:
    """Rows ``first_row`` onwards (``rows`` of them; all by default) of a GGUF tensor's stored bytes (its
    quantized blocks), read from the file; a 1-D tensor is read whole."""
    shape = tensor.raw_shape
    if len(shape) == 1:
        first_row, count, row_bytes = 0, 1, tensor.n_bytes
    else:
        row_bytes = int(np.prod(shape[1:])) * tensor.raw_dtype.itemsize
        count = shape[0] - first_row if rows is None else rows
    buffer = np.empty(count * row_bytes, dtype=np.uint8)
    source.seek(tensor.data_offset + first_row * row_bytes)
    if source.readinto(memoryview(buffer)) != buffer.size:
        raise SparseGPTError(f"GGUF tensor {tensor.name} is truncated")
    raw = buffer.view(tensor.raw_dtype)
    return raw.reshape(shape) if len(shape) == 1 else raw.reshape(count, *shape[1:])


def _convert_tensor(
    source: Any, tensor: _StoredTensor, names: dict[str, str], processor: Any, writer: _ShardWriter, pending: dict
) -> None:
    """Dequantize one GGUF tensor (in pieces of rows when large and left as it is by the processor) and
    hand it, renamed, to the writer; what the processor keeps aside goes into ``pending``."""
    from gguf import dequantize

    def rows_of(start: int, count: int) -> np.ndarray:
        return dequantize(_read_raw(source, tensor, start, count), tensor.tensor_type)

    out_bytes = int(np.prod(tensor.shape)) * 4
    if out_bytes > PIECE_BYTES and len(tensor.raw_shape) == 2 and tensor.name in names:
        rows = tensor.raw_shape[0]
        probe = rows_of(0, 1)
        if _leaves_rows_alone(processor, tensor.name, probe, names):
            step = max(1, PIECE_BYTES // (out_bytes // rows))
            pieces = (torch.from_numpy(rows_of(start, min(step, rows - start))) for start in range(0, rows, step))
            writer.add_pieces(names[tensor.name], (rows, *probe.shape[1:]), pieces)
            return
    weights = dequantize(_read_raw(source, tensor), tensor.tensor_type)
    kept = {"tensors": pending}
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=kept)
    if result.name is None or result.name not in names:
        return  # taken aside by the processor (into ``pending``), or not a tensor of the model
    writer.add(names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32)))


def _leaves_rows_alone(processor: Any, name: str, probe: np.ndarray, names: dict[str, str]) -> bool:
    """Whether transformers' processor keeps the tensor ``name`` as it is (tried on its first row
    ``probe``), so that it may be converted in pieces of rows; a processor that reshapes rows (Llama's
    query and key weights) fails or changes the probe."""
    kept: dict[str, Any] = {"tensors": {}}
    try:
        result = processor.process(weights=probe.copy(), name=name, tensor_key_mapping=names, parsed_parameters=kept)
    except (ValueError, IndexError):
        return False
    return result.name == name and not kept["tensors"] and np.array_equal(result.weights, probe)


class _ShardWriter:
    """Float32 tensors appended to ``model-NNNNN.safetensors`` files, each header written when its shard
    closes into room reserved at its start; then the index."""

    def __init__(self, folder: Path, tensors: int) -> None:
        self.folder = folder
        self.room = (HEADER_ENTRY_BYTES * tensors + 1024 + 7) // 8 * 8
        self.shards: list[tuple[str, dict[str, Any]]] = []
        self.handle: Any = None
        self.offset = 0
        self.total = 0

    def _open(self) -> None:
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        self.shards.append((name, {}))
        self.handle = open(self.folder / name, "wb")  # noqa: SIM115 (open across calls; _finish_shard closes it)
        self.handle.seek(8 + self.room)
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_pieces(name, tuple(tensor.shape), iter([tensor]))

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in list(tensors):
            self.add(name, tensors.pop(name).float())

    def add_pieces(self, name: str, shape: tuple[int, ...], pieces: Any) -> None:
        """Append one tensor of ``shape`` given as consecutive pieces of rows."""
        if self.handle is None or self.offset >= SHARD_BYTES:
            self._finish_shard()
            self._open()
        start = self.offset
        for piece in pieces:
            flat = piece.to(torch.float32).contiguous().reshape(-1)
            self.handle.write(memoryview(flat.view(torch.uint8).numpy()))
            self.offset += flat.numel() * 4
        if self.offset - start != int(np.prod(shape)) * 4:
            raise SparseGPTError(f"GGUF tensor {name}: {self.offset - start} bytes for shape {list(shape)}")
        self.shards[-1][1][name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [start, self.offset]}
        self.total += self.offset - start

    def _finish_shard(self) -> None:
        if self.handle is None:
            return
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.shards[-1][1]}, separators=(",", ":"))
        encoded = header.encode()
        if len(encoded) > self.room:
            raise SparseGPTError("GGUF conversion: a shard's header outgrew its reserved room")
        self.handle.seek(0)
        self.handle.write(self.room.to_bytes(8, "little"))
        self.handle.write(encoded + b" " * (self.room - len(encoded)))
        self.handle.close()
        self.handle = None

    def close(self) -> dict[str, tuple[int, ...]]:
        """Finish the last shard and write the index; returns the shapes written, by name."""
        self._finish_shard()
        count = len(self.shards)
        weight_map = {}
        for number, (name, entries) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / name, self.folder / final)
            weight_map.update(dict.fromkeys(entries, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return {name: tuple(entry["shape"]) for _, entries in self.shards for name, entry in entries.items()}
