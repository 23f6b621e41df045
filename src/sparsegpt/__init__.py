"""sparsegpt: one-shot pruning of large language models (SparseGPT, Frantar & Alistarh 2023)."""

from sparsegpt import data
from sparsegpt._version import __version__
from sparsegpt.api import (
    Evaluation,
    PruneResult,
    compare,
    evaluate,
    evaluate_streamed,
    evaluate_tasks_streamed,
    plan_streamed,
    prune,
    prune_streamed,
    sweep,
)
from sparsegpt.config import METHODS, PruneConfig
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.compact import pack_folder, unpack_folder
from sparsegpt.generation import Generation, generate
from sparsegpt.loading import load_model, load_pretrained
from sparsegpt.pipeline import prune_model
from sparsegpt.report import LayerRecord
from sparsegpt.runtime.linear import PackedWeight, SparseLinear
from sparsegpt.solver import NMPattern
from sparsegpt.solver.quant import QuantGrid
from sparsegpt.zeroshot import OFFLINE_TASKS, TaskScore, ZeroShot, evaluate_tasks

__all__ = [
    "__version__",
    "METHODS",
    "OFFLINE_TASKS",
    "Evaluation",
    "Generation",
    "LayerRecord",
    "NMPattern",
    "PackedWeight",
    "PruneConfig",
    "PruneResult",
    "QuantGrid",
    "SparseGPTError",
    "SparseLinear",
    "TaskScore",
    "ZeroShot",
    "compare",
    "data",
    "evaluate",
    "evaluate_streamed",
    "evaluate_tasks",
    "evaluate_tasks_streamed",
    "generate",
    "load_model",
    "load_pretrained",
    "pack_folder",
    "plan_streamed",
    "prune",
    "prune_model",
    "prune_streamed",
    "sweep",
    "unpack_folder",
]
