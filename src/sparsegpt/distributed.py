"""Several processes pruning one model (``torchrun --nproc-per-node K -m sparsegpt prune ...``).

Every process holds the model and runs the same pipeline on its share of the calibration batches.
After a block is observed, the input statistics are summed over processes (``all_reduce``), so every
process holds the Hessians a single process would (up to the order of floating-point summation); the
block's weights are then solved round-robin, each by one process, and broadcast from it; each process
advances its own batches. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver import InputStatistics

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes."""

    rank: int
    world: int

    @staticmethod
    def from_environment(device: torch.device | None = None) -> Ranks | None:
        """Join the process group that ``torchrun`` describes in the environment (None when run alone)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch.distributed as dist

        cuda = device is not None and device.type == "cuda"
        if cuda:  # one GPU per process: "cuda" then means this process's own
            local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= visible:
                raise SparseGPTError(
                    f"process {local_rank} has no GPU of its own: NCCL needs one GPU per process and torch sees "
                    f"{visible}; start at most {visible} processes per machine, or use --device cpu"
                )
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size())

    @property
    def leader(self) -> bool:
        """The process that writes files and prints."""
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This process's share of ``items`` (every world-th, from its rank)."""
        if len(items) < self.world:
            raise SparseGPTError(
                f"{len(items)} calibration batches cannot be split over {self.world} processes "
                "(more windows or a smaller --batch-size)"
            )
        return items[self.rank :: self.world]

    def owner(self, index: int) -> int:
        """The process that solves the ``index``-th weight of a block."""
        return index % self.world

    def sum_statistics(self, statistics: dict[str, InputStatistics]) -> None:
        """Sum every distinct statistics object over the processes, in place (same order on every one)."""
        import torch.distributed as dist

        seen: set[int] = set()
        for name in sorted(statistics):
            stats = statistics[name]
            if id(stats) in seen:
                continue
            seen.add(id(stats))
            dist.all_reduce(stats.gram if stats.gram is not None else stats.squares)
            tokens = torch.tensor([stats.tokens], dtype=torch.int64, device=_device_of(stats))
            dist.all_reduce(tokens)
            stats.tokens = int(tokens.item())

    def broadcast_tensor(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """``tensor`` as process ``source`` has it (a contiguous copy is sent)."""
        import torch.distributed as dist

        buffer = tensor.detach().contiguous().clone()
        dist.broadcast(buffer, source)
        return buffer

    def broadcast_object(self, value: Any, source: int) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, source)
        return box[0]

    def check_statistics_names(self, names: list[str]) -> None:
        """Every process must have observed the same weights (the same model, the same block)."""
        everyone = [None] * self.world
        import torch.distributed as dist

        dist.all_gather_object(everyone, sorted(names))
        if any(other != everyone[0] for other in everyone):
            raise SparseGPTError("the processes observed different layers; are they pruning the same model?")


def _device_of(stats: InputStatistics) -> torch.device:
    tensor = stats.gram if stats.gram is not None else stats.squares
    assert tensor is not None
    return tensor.device


def finish() -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
