"""sparsegpt: one-shot pruning of large language models (SparseGPT, Frantar & Alistarh 2023)."""

__version__ = "0.1.0"

from sparsegpt import data  # noqa: E402
from sparsegpt.api import (  # noqa: E402
    Evaluation,
    PruneResult,
    compare,
    evaluate,
    evaluate_streamed,
    plan_streamed,
    prune,
    prune_streamed,
    sweep,
)
from sparsegpt.compact import pack_folder, unpack_folder  # noqa: E402
from sparsegpt.config import METHODS, PruneConfig  # noqa: E402
from sparsegpt.errors import SparseGPTError  # noqa: E402
from sparsegpt.models import load_model, load_pretrained  # noqa: E402
from sparsegpt.pipeline import LayerRecord, prune_model  # noqa: E402
from sparsegpt.solver import NMPattern  # noqa: E402
from sparsegpt.solver.quant import QuantGrid  # noqa: E402

__all__ = [
    "METHODS",
    "Evaluation",
    "LayerRecord",
    "NMPattern",
    "PruneConfig",
    "PruneResult",
    "QuantGrid",
    "SparseGPTError",
    "compare",
    "data",
    "evaluate",
    "evaluate_streamed",
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
