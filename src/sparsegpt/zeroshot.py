"""Zero-shot tasks through EleutherAI's lm-evaluation-harness (``lm-eval`` 0.4.x), with offline data.

The harness does the work: its task definitions (prompts, choices, metrics), its scoring and its model
interface for transformers models (``HFLM``), given the model this project loaded. This module only points
seven of its tasks at data in the cache (``assets.task_data_folder``) instead of the Hugging Face Hub, so
that they run offline with the harness's own prompt formats:

- arc_easy, arc_challenge, boolq, hellaswag, piqa, winogrande: their validation splits (the harness scores
  ARC on its test split, which the offline data lacks: ARC figures here are validation figures);
- lambada: the harness's ``lambada_openai`` (OpenAI's test set, 5153 documents), acc and perplexity.

Any other task name the harness knows runs as the harness defines it, its data from the Hub (online).
Float32 models on a CPU with fast bf16 products score their linear layers in split-bfloat16 unless told
otherwise (``perplexity.scoring_precision``), as perplexity does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsegpt import assets
from sparsegpt.errors import SparseGPTError
from sparsegpt.perplexity import check_eval_precision, resolve_eval_precision, scoring_precision

log = logging.getLogger(__name__)

OFFLINE_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
}
"""Task name -> (the harness's definition, under ``lm_eval/tasks/``; the split scored from the cache)."""

INSTALL_HINT = "zero-shot tasks need lm-evaluation-harness: pip install 'sparsegpt[tasks]'"


@dataclass
class ZeroShot:
    """Zero-shot tasks to score and how: ``tasks`` are names of ``OFFLINE_TASKS`` (or any task the harness
    knows, its data from the Hub); ``limit`` caps the documents per task (None: all); ``precision`` as for
    perplexity (``perplexity.EVAL_PRECISIONS``); ``batch_size`` requests per forward."""

    tasks: list[str]
    limit: int | None = None
    precision: str = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SparseGPTError("no zero-shot task named")
        check_limit(self.limit)
        check_eval_precision(self.precision)
        if self.batch_size < 1:
            raise SparseGPTError(f"the tasks' batch size must be at least 1, not {self.batch_size}")


@dataclass(frozen=True)
class TaskScore:
    """One task's figures as the harness reports them (standard errors of the mean over documents)."""

    task: str
    docs: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None  # lambada: of the last word

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None and key != "task"}


def parse_tasks(text: str) -> list[str]:
    """The task names of a comma-separated list, in order, each once (checked by ``check_tasks``)."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise SparseGPTError("--tasks names no task")
    return names


def check_tasks(names: list[str]) -> None:
    """Raise a one-line ``SparseGPTError`` for a task that neither runs offline nor is a harness task, or
    when the harness is not installed. The offline tasks' data is fetched here (once) if missing."""
    harness = _harness_tasks_folder()
    others = [name for name in names if name not in OFFLINE_TASKS]
    if others:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [name for name in others if name not in known]
        if unknown:
            offline = ", ".join(OFFLINE_TASKS)
            raise SparseGPTError(f"unknown task {unknown[0]!r}; offline tasks: {offline} (or an lm-eval task name)")
    for name in names:
        if name in OFFLINE_TASKS and not (harness / OFFLINE_TASKS[name][0]).is_file():
            raise SparseGPTError(f"this lm-eval has no task definition {OFFLINE_TASKS[name][0]} for {name}")
    if any(name in OFFLINE_TASKS for name in names):
        assets.task_data_folder()


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise SparseGPTError(f"--limit must be at least 1 document per task, not {limit}")


def _harness_tasks_folder() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise SparseGPTError(INSTALL_HINT) from None
    return Path(lm_eval.tasks.__file__).parent


def _boolq_labels(dataset: Any) -> Any:
    """The cached BoolQ holds ``answer`` (a bool) where the harness's SuperGLUE copy holds ``label`` (0 = no,
    1 = yes); the prompt and choices are the harness's."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def offline_config(name: str, data: Path) -> dict[str, Any]:
    """The harness's task config for ``name``, its data read from ``data`` (``assets.task_data_folder``)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    definition, split = OFFLINE_TASKS[name]
    config = load_yaml(_harness_tasks_folder() / definition, resolve_func=True)
    config.pop("tag", None)
    file = data / name / (f"{split}.arrow" if split == "validation" else f"{split}.jsonl")
    if not file.is_file():
        raise SparseGPTError(f"the data of task {name} is missing from the cache ({file}); run sparsegpt fetch-assets")
    config.update(
        dataset_path="arrow" if file.suffix == ".arrow" else "json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(file)}, "cache_dir": str(assets.cache_root() / "datasets")},
        training_split=None,
        validation_split=split if split == "validation" else None,
        test_split=split if split == "test" else None,
        fewshot_split=None,
    )
    if name == "boolq":
        config["process_docs"] = _boolq_labels
    return config


def _task_objects(names: list[str]) -> tuple[list[Any], dict[str, str]]:
    """Harness tasks for ``names`` (offline ones from the cache, any other by its name), and the name
    each one's results come under -> the name asked (lambada's come as lambada_openai)."""
    from lm_eval.api.task import ConfigurableTask

    data = assets.task_data_folder() if any(name in OFFLINE_TASKS for name in names) else None
    tasks: list[Any] = []
    reported = {}
    for name in names:
        if name in OFFLINE_TASKS:
            assert data is not None
            config = offline_config(name, data)
            tasks.append(ConfigurableTask(config=config))
            reported[config["task"]] = name
        else:
            tasks.append(name)
            reported[name] = name
    return tasks, reported


def harness_model(model: nn.Module, tokenizer: Any, batch_size: int = 8, progress: bool = False) -> Any:
    """The harness's transformers model interface (``HFLM``) around an already loaded model; its progress
    bar shows only with ``progress``."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SparseGPTError(INSTALL_HINT) from None
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=not progress)
    return lm


def run_harness(lm: Any, names: list[str], limit: int | None = None) -> dict[str, TaskScore]:
    """Score the harness model ``lm`` on ``names`` (zero-shot, at most ``limit`` documents each)."""
    from lm_eval import simple_evaluate

    check_limit(limit)
    tasks, reported = _task_objects(names)
    printed = io.StringIO()  # the harness prints a line of its own when it bootstraps a standard error
    try:
        with contextlib.redirect_stdout(printed):
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=0,
                limit=limit,
                bootstrap_iters=1000,
                log_samples=False,
            )
    except (OSError, ConnectionError) as error:
        raise SparseGPTError(f"cannot load task data: {str(error).splitlines()[0]}") from error
    finally:
        for line in printed.getvalue().splitlines():
            log.debug("lm-eval: %s", line)
    if out is None:
        raise SparseGPTError("the harness returned no results")
    scores = {}
    for task, figures in out["results"].items():
        if task not in reported:
            continue
        docs = out.get("n-samples", {}).get(task, {}).get("effective")
        scores[reported[task]] = _score_of(reported[task], figures, docs)
    return {name: scores[name] for name in names if name in scores}


def _score_of(name: str, figures: dict[str, Any], docs: int | None) -> TaskScore:
    def figure(key: str) -> float | None:
        value = figures.get(f"{key},none")
        return None if value is None or value == "N/A" else float(value)

    acc, acc_stderr = figure("acc"), figure("acc_stderr")
    if acc is None:
        raise SparseGPTError(f"task {name} reports no accuracy; only tasks scored by accuracy are supported")
    return TaskScore(
        name,
        int(docs or 0),
        acc,
        acc_stderr if acc_stderr is not None else math.nan,
        figure("acc_norm"),
        figure("acc_norm_stderr"),
        figure("perplexity"),
    )


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, zero_shot: ZeroShot, progress: bool = False
) -> tuple[dict[str, TaskScore], str]:
    """Zero-shot scores of ``model`` on the tasks of ``zero_shot``; returns them and the precision they
    were scored in (one of ``perplexity.EVAL_PRECISIONS``; "model" when unchanged)."""
    resolved = resolve_eval_precision(zero_shot.precision, model)
    lm = harness_model(model, tokenizer, zero_shot.batch_size, progress)
    with torch.no_grad(), scoring_precision(model, resolved), _quiet_datasets(progress):
        scores = run_harness(lm, zero_shot.tasks, zero_shot.limit)
    return scores, resolved or "model"


@contextlib.contextmanager
def _quiet_datasets(progress: bool) -> Iterator[None]:
    """``datasets``' own progress bars (reading the task files) off unless ``progress``; as before after."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    if shown and not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown and not progress:
            datasets.enable_progress_bars()


def evaluate_tasks_streamed(
    folder: Path,
    tokenizer: Any,
    zero_shot: ZeroShot,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | None = None,
    offload_dir: Path | None = None,
    progress: bool = False,
) -> tuple[dict[str, TaskScore], str]:
    """Zero-shot scores of the model in ``folder`` holding one decoder block at a time (in the model's own
    precision): every request of the harness's call goes through each block together, their hidden states
    kept in memory or, with ``offload_dir``, in files there."""
    from sparsegpt.streaming.weights import open_skeleton

    with contextlib.ExitStack() as stack, torch.no_grad(), _quiet_datasets(progress):
        skeleton = open_skeleton(folder, dtype, device or torch.device("cpu"), stack)
        lm = _streamed_harness_model(skeleton, tokenizer, zero_shot.batch_size, offload_dir, progress)
        return run_harness(lm, zero_shot.tasks, zero_shot.limit), "model"


def _streamed_harness_model(
    skeleton: Any, tokenizer: Any, batch_size: int, offload_dir: Path | None, progress: bool
) -> Any:
    """``HFLM`` (its tokenization and request handling) over a streamed skeleton, whose scoring of
    token requests goes through the blocks one at a time (``loglikelihoods_streamed``)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SparseGPTError(INSTALL_HINT) from None

    class StreamedHFLM(HFLM):
        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: Any = None) -> list:
            return loglikelihoods_streamed(skeleton, requests, self.max_length, batch_size, offload_dir, progress)

    lm = StreamedHFLM(
        pretrained=skeleton.model, tokenizer=tokenizer, batch_size=batch_size, device=str(skeleton.device)
    )
    lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=not progress)
    return lm


def loglikelihoods_streamed(
    skeleton: Any,
    requests: list[tuple[Any, list[int], list[int]]],
    max_length: int,
    batch_size: int,
    offload_dir: Path | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether it is the greedy one) of each (key, context tokens,
    continuation tokens) request, as the harness's transformers model scores them: the last
    ``max_length`` tokens of context + continuation less its last token in, the continuation's
    log-probabilities summed. Requests are batched longest first, right-padded (a causal model's earlier
    positions do not see the padding)."""
    from sparsegpt.streaming.driver import logits_streamed

    inputs = [
        ((context + continuation)[-(max_length + 1) :][:-1], continuation) for _, context, continuation in requests
    ]
    order = sorted(range(len(inputs)), key=lambda index: -len(inputs[index][0]))
    groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches = []
    for group in groups:
        batch = torch.zeros(len(group), len(inputs[group[0]][0]), dtype=torch.long)
        for row, index in enumerate(group):
            batch[row, : len(inputs[index][0])] = torch.tensor(inputs[index][0])
        batches.append(batch.to(skeleton.device))
    results: list[tuple[float, bool]] = [(math.nan, False)] * len(requests)

    def score(number: int, logits: torch.Tensor) -> None:
        for row, index in enumerate(groups[number]):
            tokens, continuation = inputs[index]
            end = len(tokens)
            logprobs = torch.log_softmax(logits[row, end - len(continuation) : end].float(), dim=-1)
            target = torch.tensor(continuation, device=logprobs.device)
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            results[index] = (float(logprobs.gather(1, target[:, None]).sum()), greedy)

    logits_streamed(skeleton, batches, score, offload_dir, "zero-shot requests (streamed)", progress)
    return results


def average_accuracy(scores: dict[str, TaskScore]) -> float:
    """Mean accuracy over tasks (each task weighs the same)."""
    return sum(score.acc for score in scores.values()) / len(scores) if scores else math.nan


def task_summary(scores: dict[str, TaskScore], precision: str | None) -> dict[str, Any]:
    """What a report, a row or ``eval --json`` says of zero-shot scores: each task's figures ("tasks"),
    their mean accuracy ("tasks_average_acc") and the precision they were scored in ("tasks_precision");
    nothing when no task was scored."""
    if not scores:
        return {}
    return {
        "tasks": {name: score.as_dict() for name, score in scores.items()},
        "tasks_average_acc": average_accuracy(scores),
        "tasks_precision": precision,
    }
