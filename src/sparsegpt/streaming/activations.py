"""The hidden states of every calibration batch between two decoder blocks of a streamed run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.shards import load_safetensors, save_durably


class Activations:
    """The hidden states of every calibration batch between two blocks, list-like: in CPU memory, or
    spilled to one safetensors file per batch in ``folder``. Handed out on ``device``.

    Writes go to the next *generation*; ``commit`` makes it the one read (so an interrupted block leaves
    the previous generation whole), ``drop_old`` deletes the generation before it.
    """

    def __init__(self, count: int, device: torch.device, folder: Path | None = None, generation: int = 0) -> None:
        self.count = count
        self.device = device
        self.folder = folder
        self.generation = generation
        self._memory: list[torch.Tensor | None] = [None] * count
        self._next: list[torch.Tensor | None] = [None] * count

    def _path(self, generation: int, batch: int) -> Path:
        assert self.folder is not None
        return self.folder / f"hidden-{generation:05d}-{batch:05d}.safetensors"

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[batch] for batch in range(self.count))

    def __getitem__(self, batch: int) -> torch.Tensor:
        if self.folder is None:
            tensor = self._memory[batch]
            assert tensor is not None
            return tensor.to(self.device)
        return load_safetensors(self._path(self.generation, batch))["hidden"].to(self.device)

    def __setitem__(self, batch: int, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self._next[batch] = tensor.to("cpu")
            return
        save_durably({"hidden": tensor}, self._path(self.generation + 1, batch))

    def fill(self, tensors: list[torch.Tensor]) -> None:
        """Set every batch and commit (the states entering the first block)."""
        for batch, tensor in enumerate(tensors):
            self[batch] = tensor
        self.commit()

    def commit(self) -> None:
        """Make the states written since the last commit the ones read."""
        if self.folder is None:
            self._memory, self._next = self._next, [None] * self.count
        self.generation += 1

    def drop_old(self) -> None:
        """Delete the generation before the current one (spilled states only)."""
        if self.folder is not None:
            for batch in range(self.count):
                self._path(self.generation - 1, batch).unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every state (deletes spilled files)."""
        if self.folder is not None:
            for generation in (self.generation - 1, self.generation, self.generation + 1):
                for batch in range(self.count):
                    self._path(generation, batch).unlink(missing_ok=True)
        self._memory = [None] * self.count
        self._next = [None] * self.count

    def checkpoint(self, folder: Path) -> dict[str, Any]:
        """Make the current generation durable; returns what ``restore`` needs."""
        if self.folder is not None:
            return {"folder": str(self.folder), "generation": self.generation}
        name = f"activations-{self.generation:05d}.safetensors"
        save_durably(
            {f"{batch}": tensor for batch, tensor in enumerate(self._memory) if tensor is not None}, folder / name
        )
        return {"file": name, "generation": self.generation}

    def forget_checkpoint(self, folder: Path, saved: dict[str, Any]) -> None:
        """Delete a checkpoint that a newer one replaced."""
        if "file" in saved:
            (folder / saved["file"]).unlink(missing_ok=True)

    @classmethod
    def restore(cls, saved: dict[str, Any], count: int, device: torch.device, folder: Path) -> Activations:
        """The store a ``checkpoint`` described."""
        if "file" not in saved:
            store = cls(count, device, Path(saved["folder"]), int(saved["generation"]))
            missing = [b for b in range(count) if not store._path(store.generation, b).is_file()]
            if missing:
                raise SparseGPTError(f"cannot resume: spilled activations are missing from {store.folder}")
            return store
        store = cls(count, device, None, int(saved["generation"]))
        tensors = load_safetensors(folder / saved["file"])
        store._memory = [tensors[f"{batch}"] for batch in range(count)]
        return store
