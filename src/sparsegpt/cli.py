"""The ``sparsegpt`` command: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from sparsegpt.config import ALLOCATIONS, FORWARD_DTYPES, METHODS, PruneConfig, parse_override
from sparsegpt.distributed import Ranks, finish
from sparsegpt.errors import SparseGPTError
from sparsegpt.host import keep_freed_memory, resolve_device, return_freed_memory
from sparsegpt.perplexity import EVAL_PRECISIONS, check_eval_precision, resolve_eval_precision
from sparsegpt.solver import NMPattern
from sparsegpt.solver.refine import MASK_SCORES
from sparsegpt.zeroshot import OFFLINE_TASKS

log = logging.getLogger(__name__)

EXIT_USAGE = 2
DEMO_HINT = "example: sparsegpt prune smollm2-135m -o pruned --calib sotu:train --eval sotu:test"


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="transformers folder, GGUF file, hub id, or alias (smollm2-135m)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="precision the model runs in; Hessians are always fp32 (default: auto)",
    )


def _add_runtime_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runtime",
        default="dense",
        choices=["dense", "sparse"],
        help="dense: decode every weight; sparse: run pruned linears from their compact encoding (a folder)",
    )


def _add_prune_options(parser: argparse.ArgumentParser) -> None:
    defaults = PruneConfig()
    parser.add_argument(
        "--sparsity", type=float, default=None, help=f"share of weights to remove (default {defaults.sparsity})"
    )
    parser.add_argument("--pattern", default=None, help="semi-structured N:M: N of every M inputs pruned, e.g. 2:4")
    parser.add_argument("--calib", default="sotu:train", help="calibration text source (default sotu:train)")
    parser.add_argument("--nsamples", type=int, default=defaults.nsamples, help="calibration windows")
    parser.add_argument(
        "--seqlen", type=int, default=defaults.seqlen, help="tokens per window (capped at the model's context)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--damp", type=float, default=defaults.damp, help="relative Hessian damping")
    parser.add_argument("--blocksize", type=int, default=defaults.blocksize, help="lazy-update block of columns")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="calibration windows per forward")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=SPARSITY|skip",
        help="per-layer sparsity by glob on the layer name (repeatable)",
    )
    parser.add_argument(
        "--allocation",
        default=defaults.allocation,
        choices=ALLOCATIONS,
        help="uniform: every layer at the target; owl: blocks with more outlier weights pruned less (same total)",
    )
    parser.add_argument("--owl-outlier", type=float, default=defaults.owl_outlier, help="OWL outlier threshold M")
    parser.add_argument("--owl-lambda", type=float, default=defaults.owl_lambda, help="OWL spread of block sparsities")
    parser.add_argument(
        "--mask-score",
        default=defaults.mask_score,
        choices=MASK_SCORES,
        help="sparsegpt: mask chosen in the sweep (w²/[H⁻¹]²); wanda, ria: mask fixed before it",
    )
    parser.add_argument(
        "--repair", type=int, default=0, metavar="N", help="up to N prune-and-grow swaps per row that lower the error"
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="up to N conjugate-gradient steps towards the best kept weights for each layer's mask",
    )
    parser.add_argument(
        "--low-rank",
        type=int,
        default=0,
        metavar="R",
        help="add a rank-R term BA to every pruned layer, fitted in closed form to its outputs (saved as a PEFT "
        "LoRA adapter in low_rank_adapter/)",
    )
    parser.add_argument(
        "--low-rank-budget",
        type=float,
        default=None,
        metavar="F",
        help="instead of --low-rank: each layer's rank so that its factors take at most the share F of its weights",
    )
    parser.add_argument(
        "--low-rank-rounds",
        type=int,
        default=0,
        metavar="K",
        help="K rounds alternating between re-solving the kept weights for W - BA and re-fitting BA",
    )
    parser.add_argument(
        "--low-rank-remask",
        action="store_true",
        help="in each of those rounds, prune W - BA afresh first, so that the mask follows the factors",
    )
    parser.add_argument(
        "--forward-dtype",
        default="auto",
        choices=FORWARD_DTYPES,
        help="precision of the calibration forward passes (autocast). auto (default): bfloat16 for unstructured "
        "SparseGPT and for Wanda on a float32 model where this host multiplies bf16 fast (measured once and "
        "cached; bf16 forwards were measured to keep their accuracy), else none: the model's own. Hessians "
        "and solves stay float32",
    )
    parser.add_argument("--eval", nargs="+", default=[], metavar="SOURCE", help="perplexity sources after pruning")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluate at most N windows per source")
    _add_eval_precision_option(parser)
    _add_task_options(parser)


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks",
        default=None,
        metavar="TASK[,TASK...]",
        help="zero-shot tasks through lm-evaluation-harness, comma-separated: "
        f"{','.join(OFFLINE_TASKS)} run offline from the cache; any other lm-eval task reads the Hub",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N documents per task")


def _add_eval_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-precision",
        default="auto",
        metavar="|".join(EVAL_PRECISIONS),
        help="precision perplexity is scored in. auto (default): split-bfloat16 for a float32 model where this "
        "host runs it fast (measured once and cached), else model: the model's own precision. split-bfloat16: "
        "each linear's inputs rounded to bf16, its weight split into two bf16 parts, products summed in "
        "float32; bfloat16: autocast, the output layer in float32 (faster, less exact)",
    )


def _add_stream_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stream",
        action="store_true",
        help="hold one decoder block in memory at a time, reading weights from the folder's safetensors",
    )
    parser.add_argument(
        "--offload-dir",
        type=Path,
        default=None,
        help="keep activations between blocks in files here (implies --stream)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where blocks and Hessians are computed: cpu, cuda, cuda:N or auto (default cpu)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, but a command line it cannot parse gets the project's one line (and a pointer to
    ``--help``) instead of the whole usage text; argparse makes its subcommand parsers of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsegpt", description="One-shot pruning of causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logging")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a model and save it", epilog=DEMO_HINT)
    _add_model_options(prune)
    prune.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    prune.add_argument("--method", default="sparsegpt", choices=METHODS)
    _add_prune_options(prune)
    prune.add_argument("--bits", type=int, default=None, help="also quantize kept weights to 2..8 bits (GPTQ grid)")
    prune.add_argument(
        "--group-size", type=int, default=None, help="inputs per quantization group (default: the whole row)"
    )
    prune.add_argument("--symmetric", action="store_true", help="symmetric quantization grid (default asymmetric)")
    prune.add_argument(
        "--format",
        default="dense",
        choices=["dense", "compact"],
        help="dense: a plain transformers folder; compact: kept values + packed masks (docs/FORMAT.md)",
    )
    prune.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _add_stream_options(prune)
    prune.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="K",
        help="run K processes (torchrun; gloo on CPU, NCCL on CUDA): calibration batches and layer solves divided",
    )
    prune.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --stream run to the same output (implies --stream)",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="print the streamed run's plan and expected peak memory, then stop"
    )

    for name, text in (
        ("pack", "convert a transformers folder into a compact one"),
        ("unpack", "convert a compact folder back into a transformers folder"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("source", type=Path, help="input folder")
        command.add_argument("output", type=Path, help="output folder")
        command.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    evaluate = commands.add_parser("eval", help="perplexity of a model on a text, zero-shot tasks")
    _add_model_options(evaluate)
    evaluate.add_argument("--data", default=None, help="text source to score perplexity on")
    evaluate.add_argument("--seqlen", type=int, default=2048)
    evaluate.add_argument("--windows", type=int, default=None, help="at most N windows")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    _add_eval_precision_option(evaluate)
    _add_task_options(evaluate)
    _add_runtime_option(evaluate)
    _add_stream_options(evaluate)

    generate = commands.add_parser("generate", help="continue a prompt; prints the text and the speeds")
    _add_model_options(generate)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="at most N new tokens (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sampled")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    generate.add_argument("--json", action="store_true", help="print JSON")
    _add_runtime_option(generate)

    compare = commands.add_parser("compare", help="dense and several methods side by side")
    _add_model_options(compare)
    compare.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    _add_prune_options(compare)
    compare.add_argument("--report", type=Path, default=None, help="write the comparison as JSON here")

    sweep = commands.add_parser(
        "sweep", help="perplexity of several methods at several sparsities: JSON, a table and a plot"
    )
    _add_model_options(sweep)
    sweep.add_argument("-o", "--output", required=True, type=Path, help="folder for sweep.json, sweep.md, sweep.png")
    sweep.add_argument("--sparsities", default="0.5,0.6,0.7,0.8", help="unstructured levels, comma-separated")
    sweep.add_argument("--patterns", default="", help="N:M patterns too, comma-separated (e.g. 2:4,4:8)")
    sweep.add_argument(
        "--methods",
        default="magnitude,wanda,sparsegpt",
        help="methods and variants, comma-separated: METHOD[+owl][+refine][+repair][+wanda|+ria][+lowrank]",
    )
    _add_prune_options(sweep)
    sweep.set_defaults(eval=["sotu:test"])
    sweep.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep to the same output: the rows it measured are kept",
    )

    commands.add_parser("fetch-assets", help="download and prepare the default model and texts")
    return parser


def _config(args: argparse.Namespace, method: str) -> PruneConfig:
    quantization = {
        "bits": getattr(args, "bits", None),
        "group_size": getattr(args, "group_size", None),
        "symmetric": getattr(args, "symmetric", False),
    }
    pattern = NMPattern.parse(args.pattern) if args.pattern else None
    if pattern is not None and args.sparsity is not None and abs(args.sparsity - pattern.sparsity) > 1e-9:
        raise SparseGPTError(
            f"--sparsity {args.sparsity} conflicts with --pattern {pattern} (which means {pattern.sparsity:g})"
        )
    return PruneConfig(
        method=method,
        sparsity=args.sparsity if args.sparsity is not None else PruneConfig.sparsity,
        pattern=pattern,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        damp=args.damp,
        blocksize=args.blocksize,
        batch_size=args.batch_size,
        overrides=tuple(parse_override(text) for text in args.override),
        allocation=args.allocation,
        owl_outlier=args.owl_outlier,
        owl_lambda=args.owl_lambda,
        mask_score=args.mask_score,
        repair=args.repair,
        refine=args.refine,
        low_rank=args.low_rank,
        low_rank_budget=args.low_rank_budget,
        low_rank_rounds=args.low_rank_rounds,
        low_rank_remask=args.low_rank_remask,
        forward_dtype=args.forward_dtype,
        **quantization,
    )


def _layer_table(layers: list[Any]) -> str:
    lines = [f"{'layer':<48} {'shape':>12} {'sparsity':>8} {'error':>9} {'seconds':>8}"]
    for layer in layers:
        error = f"{layer.error:.5f}" if layer.error is not None else "-"
        shape = "x".join(str(size) for size in layer.shape)
        lines.append(f"{layer.name:<48} {shape:>12} {layer.sparsity:>8.4f} {error:>9} {layer.seconds:>8.2f}")
    return "\n".join(lines)


def _comparison_table(result: dict[str, Any]) -> str:
    """Perplexity per source, then (with tasks) accuracy per task and their mean, one row per method."""
    rows = result["rows"]
    sources = list(rows[0]["ppl"]) if rows else []
    tasks = list(rows[0].get("tasks", {})) if rows else []
    header = f"{'method':<12} {'sparsity':>8} {'prune s':>8}" + "".join(f" {name:>14}" for name in sources)
    header += "".join(f" {name:>14}" for name in tasks) + (f" {'mean acc':>9}" if tasks else "")
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f" {row['ppl'][name]:>14.2f}" for name in sources)
        cells += "".join(f" {row['tasks'][name]['acc']:>14.4f}" for name in tasks)
        cells += f" {row['tasks_average_acc']:>9.4f}" if tasks else ""
        lines.append(f"{row['method']:<12} {row['sparsity']:>8.4f} {row['prune_seconds']:>8.1f}{cells}")
    if tasks:
        lines.append(f"(task columns: zero-shot acc{_scored_in(rows[0]['tasks_precision'])})")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int | None:
    """Carry out a parsed command; returns an exit status when it is not 0."""
    import sparsegpt
    from sparsegpt import assets
    from sparsegpt.formats import atomic

    progress = not args.quiet
    if args.command == "fetch-assets":
        for path in assets.fetch_all():
            print(path)
        return
    if args.command in ("pack", "unpack"):
        if not args.source.is_dir():
            raise SparseGPTError(f"no such folder: {args.source}")
        if args.command == "pack":
            manifest = sparsegpt.pack_folder(args.source, args.output, args.overwrite)
            stored = sum(entry["bytes"] for entry in manifest["tensors"].values())
            sparse = sum(entry["encoding"] != "plain" for entry in manifest["tensors"].values())
            print(
                f"packed {len(manifest['tensors'])} tensors ({sparse} sparse), {stored / 2**20:.1f} MiB, into {args.output}"
            )
        else:
            sparsegpt.unpack_folder(args.source, args.output, args.overwrite)
            print(f"unpacked into {args.output}")
        return
    if args.command == "generate":
        model, tokenizer, source = sparsegpt.load_model(args.model, args.dtype, args.runtime)
        result = sparsegpt.generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)
        speeds = {"prefill_tokens_per_s": result.prefill_speed, "decode_tokens_per_s": result.decode_speed}
        if args.json:
            print(json.dumps({"model": source, "text": result.text, "prompt_tokens": result.prompt_tokens,
                              "new_tokens": result.new_tokens, **speeds}))  # fmt: skip
        else:
            print(result.text)
            print(
                f"\n{source}: prefill {result.prompt_tokens} tokens at {result.prefill_speed:.1f} tokens/s, "
                f"decode {result.new_tokens} tokens at {result.decode_speed:.1f} tokens/s",
                file=sys.stderr,
            )
        return
    check_eval_precision(getattr(args, "eval_precision", "auto"))
    zero_shot = _zero_shot(args)
    if args.command == "eval":
        _evaluate(args, zero_shot, progress)
        return
    evaluations = [
        sparsegpt.Evaluation(source, args.seqlen, args.eval_windows, args.eval_precision) for source in args.eval
    ]
    streamed = _streamed(args)
    ranks = Ranks.from_environment(resolve_device(args.device)) if args.command == "prune" else None
    if streamed and (ranks is not None or args.processes > 1):
        raise SparseGPTError("--stream runs in one process; several processes prune a model held in memory")
    if streamed:
        _prune_streamed(args, evaluations, zero_shot, progress)
        return
    if args.command == "prune" and args.processes > 1 and ranks is None:
        device = resolve_device(args.device)
        if device.type == "cuda" and args.processes > torch.cuda.device_count():
            raise SparseGPTError(
                f"--processes {args.processes} on cuda needs {args.processes} GPUs (one per process); "
                f"torch sees {torch.cuda.device_count()}"
            )
        return _launch(args.processes, args.argv)
    if args.command == "prune":
        config = _config(args, args.method)
        atomic.check_output_folder(args.output, args.overwrite)
        if ranks is not None and not ranks.leader:  # followers prune their share; the leader saves and reports
            sparsegpt.prune(args.model, config, args.calib, [], args.dtype, False, ranks, args.device)
            return
        result = sparsegpt.prune(
            args.model, config, args.calib, evaluations, args.dtype, progress, ranks, args.device, zero_shot
        )
        result.save(args.output, args.overwrite, compact_format=args.format == "compact")
        if args.report:
            atomic.write_json_atomically(args.report, result.report())
        print(_layer_table(result.layers))
        print(
            f"\n{result.config.method}: sparsity {result.sparsity:.4f} in {result.prune_seconds:.1f} s; saved to {args.output}"
        )
        for name, value in result.ppl.items():
            print(f"perplexity on {name}: {value:.3f}{_scored_in(result.eval_precision[name])}")
        report = result.report()
        if "tasks" in report:
            print(f"zero-shot tasks{_scored_in(report['tasks_precision'])}:")
            print(_tasks_table(report["tasks"], report["tasks_average_acc"]))
        return
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    if args.allocation != "uniform" or args.mask_score != "sparsegpt":
        raise SparseGPTError(
            f"{args.command} names its variants in --methods (e.g. sparsegpt+owl, sparsegpt+ria), "
            "not with --allocation or --mask-score"
        )
    config = _config(args, "sparsegpt")
    if args.command == "sweep":
        return _sweep(args, methods, config, evaluations, zero_shot, progress)
    comparison = sparsegpt.compare(
        args.model, methods, config, args.calib, evaluations, args.dtype, progress, zero_shot
    )
    if args.report:
        atomic.write_json_atomically(args.report, comparison)
    print(
        f"{comparison['model']}; calibration {config.nsamples} x {config.seqlen} tokens of {comparison['calibration']}"
    )
    print(_comparison_table(comparison))
    for precision in sorted(set(comparison["eval_precision"].values()) - {"model"}):
        print(f"perplexity{_scored_in(precision)}")


def _zero_shot(args: argparse.Namespace) -> Any:
    """The ``ZeroShot`` of ``--tasks``/``--limit`` (None without ``--tasks``)."""
    import sparsegpt
    from sparsegpt.zeroshot import parse_tasks

    if args.tasks is None:
        if args.limit is not None:
            raise SparseGPTError("--limit counts the documents of --tasks; give --tasks too")
        return None
    return sparsegpt.ZeroShot(parse_tasks(args.tasks), args.limit, args.eval_precision)


def _evaluate(args: argparse.Namespace, zero_shot: Any, progress: bool) -> None:
    """``sparsegpt eval``: perplexity on ``--data``, zero-shot scores of ``--tasks``, or both."""
    import sparsegpt
    from sparsegpt.zeroshot import check_tasks, task_summary

    if args.data is None and zero_shot is None:
        raise SparseGPTError("eval needs --data (perplexity), --tasks (zero-shot) or both")
    evaluation = sparsegpt.Evaluation(args.data, args.seqlen, args.windows, args.eval_precision) if args.data else None
    streamed = _streamed(args)
    if streamed and args.runtime == "sparse":
        raise SparseGPTError("--runtime sparse holds the whole model; it does not stream")
    out: dict[str, Any] = {}
    if streamed:
        source = args.model
        if zero_shot is not None:
            check_tasks(zero_shot.tasks)  # before any block is read
        if evaluation is not None:
            out["data"], out["ppl"] = sparsegpt.evaluate_streamed(
                args.model, evaluation, args.dtype, args.device, args.offload_dir, progress
            )
            out["eval_precision"] = "model"
        if zero_shot is not None:
            out.update(
                task_summary(
                    *sparsegpt.evaluate_tasks_streamed(
                        args.model, zero_shot, args.dtype, args.device, args.offload_dir, progress
                    )
                )
            )
    else:
        if args.runtime == "sparse" and resolve_device(args.device).type != "cpu":
            raise SparseGPTError("--runtime sparse runs on the CPU")
        if zero_shot is not None:
            check_tasks(zero_shot.tasks)  # before the model loads
        model, tokenizer, source = sparsegpt.load_model(args.model, args.dtype, args.runtime)
        model = model.to(resolve_device(args.device))
        if evaluation is not None:
            out["data"], out["ppl"] = sparsegpt.evaluate(model, tokenizer, evaluation, progress=progress)
            precision = resolve_eval_precision(evaluation.precision, model)  # measured and cached: as scored
            out["eval_precision"] = precision or "model"
        if zero_shot is not None:
            out.update(task_summary(*sparsegpt.evaluate_tasks(model, tokenizer, zero_shot, progress)))
    if args.json:
        print(json.dumps({"model": source, **out}))
        return
    if "ppl" in out:
        print(f"{out['data']}: perplexity {out['ppl']:.3f} ({source}{_scored_in(out['eval_precision'])})")
    if "tasks" in out:
        print(f"zero-shot tasks, {source}{_scored_in(out['tasks_precision'])}:")
        print(_tasks_table(out["tasks"], out["tasks_average_acc"]))


def _tasks_table(tasks: dict[str, dict[str, Any]], average: float) -> str:
    """One line per task: documents, acc and acc_norm with their standard errors; then the mean acc."""

    def cell(figures: dict[str, Any], key: str) -> str:
        value = figures.get(key)
        return f"{value:>8.4f} ± {figures[key + '_stderr']:.4f}" if value is not None else f"{'-':>17}"

    lines = [f"{'task':<16} {'docs':>6} {'acc':>17} {'acc_norm':>17}"]
    for name, figures in tasks.items():
        extra = f"  (perplexity {figures['perplexity']:.2f})" if "perplexity" in figures else ""
        lines.append(f"{name:<16} {figures['docs']:>6} {cell(figures, 'acc')} {cell(figures, 'acc_norm')}{extra}")
    lines.append(f"{'mean acc':<16} {'':>6} {average:>8.4f}")
    return "\n".join(lines)


def _scored_in(precision: str) -> str:
    """What a perplexity line adds about its precision: nothing for the model's own."""
    if precision == "split-bfloat16":
        return "; scored with split-bfloat16 products (each linear's inputs rounded to bf16)"
    return "" if precision == "model" else "; scored with bfloat16 products, the output layer in float32"


def _sweep(
    args: argparse.Namespace,
    methods: list[str],
    config: PruneConfig,
    evaluations: list[Any],
    zero_shot: Any,
    progress: bool,
) -> None:
    import dataclasses

    import sparsegpt
    from sparsegpt.formats import atomic
    from sparsegpt.journal import RowJournal
    from sparsegpt.plot import plot_sweep

    levels = [text.strip() for text in f"{args.sparsities},{args.patterns}".split(",") if text.strip()]
    if not levels:
        raise SparseGPTError("give at least one level with --sparsities or --patterns")
    atomic.check_output_folder(args.output, args.overwrite)
    settings = {
        "model": args.model,
        "methods": methods,
        "levels": levels,
        "config": config.to_dict(),
        "calibration": args.calib,
        "evaluations": [dataclasses.asdict(evaluation) for evaluation in evaluations],
        "tasks": dataclasses.asdict(zero_shot) if zero_shot is not None else None,
        "dtype": args.dtype,
    }
    journal = RowJournal(args.output, settings, args.resume, args.overwrite)
    if journal.rows:
        log.info("resuming the sweep to %s: %d rows already measured", args.output, len(journal.rows))
    result = sparsegpt.sweep(
        args.model,
        methods,
        levels,
        config,
        args.calib,
        evaluations,
        args.dtype,
        progress,
        zero_shot,
        on_row=journal.append,
        finished=list(journal.rows),
    )
    table = _sweep_table(result)

    def fill(folder: Path) -> None:
        atomic.write_json_atomically(folder / "sweep.json", result)
        (folder / "sweep.md").write_text(table + "\n")
        plot_sweep(result, folder / "sweep.png")

    atomic.write_folder_atomically(args.output, fill, args.overwrite)
    journal.remove()
    print(table)
    for item in result["skipped"]:
        print(f"skipped {item['method']} at {item['level']}: {item['reason']}")
    print(f"\nwrote sweep.json, sweep.md and sweep.png to {args.output}")


def _sweep_table(result: dict[str, Any]) -> str:
    """Markdown: one row per method, one column per level: perplexity on the first source, then (with
    tasks) the mean zero-shot accuracy."""
    rows = result["rows"]
    source = next(iter(rows[0]["ppl"]))
    scored = _scored_in(result.get("eval_precision", {}).get(source, "model"))
    tables = [_level_grid(rows, f"perplexity on {source}", scored, lambda row: row["ppl"][source], "{:.3f}")]
    if "tasks" in rows[0]:
        title = "zero-shot mean acc over " + ", ".join(rows[0]["tasks"])
        scored = _scored_in(rows[0]["tasks_precision"])
        tables.append(_level_grid(rows, title, scored, lambda row: row["tasks_average_acc"], "{:.4f}"))
    return "\n\n".join(tables)


def _level_grid(rows: list[dict[str, Any]], title: str, scored: str, value: Any, form: str) -> str:
    levels = list(dict.fromkeys(row["level"] for row in rows if "level" in row))
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"))
    dense = next((value(row) for row in rows if row["method"] == "dense"), None)
    lines = [title + (f" (dense {form.format(dense)})" if dense is not None else "") + scored, ""]
    lines += ["| method | " + " | ".join(levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for method in methods:
        cells = []
        for text in levels:
            found = next((row for row in rows if row["method"] == method and row.get("level") == text), None)
            cells.append(form.format(value(found)) if found else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _launch(processes: int, argv: list[str]) -> int:
    """Run this same command under torchrun with ``processes`` processes; returns its exit status."""
    import subprocess

    argv = list(argv)
    for index, item in enumerate(argv):
        if item == "--processes":
            del argv[index : index + 2]
            break
        if item.startswith("--processes="):
            del argv[index]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.call([*command, "-m", "sparsegpt", *argv])


def _prune_streamed(args: argparse.Namespace, evaluations: list[Any], zero_shot: Any, progress: bool) -> None:
    import sparsegpt

    config = _config(args, args.method)
    if args.dry_run:
        plan = sparsegpt.plan_streamed(args.model, config, args.dtype, args.device, args.offload_dir)
        print(_plan_text(plan))
        from sparsegpt.streaming.driver import check_plan

        check_plan(plan)
        return
    if args.format != "dense" or args.report:
        raise SparseGPTError("--stream writes a dense folder with its report inside (no --format compact, no --report)")
    run = sparsegpt.prune_streamed(
        args.model,
        args.output,
        config,
        args.calib,
        evaluations,
        args.dtype,
        args.device,
        args.offload_dir,
        args.resume,
        args.overwrite,
        progress,
        zero_shot,
    )
    print(_layer_table(run.layers))
    resumed = f", resumed after block {run.resumed_at}" if run.resumed_at is not None else ""
    print(
        f"\n{config.method}: sparsity {run.report['sparsity']:.4f} in {run.prune_seconds:.1f} s{resumed}; saved to {run.out}"
    )
    for name, value in run.report.get("ppl", {}).items():
        print(f"perplexity on {name}: {value:.3f}")
    if "tasks" in run.report:
        print("zero-shot tasks:")
        print(_tasks_table(run.report["tasks"], run.report["tasks_average_acc"]))


def _plan_text(plan: dict[str, Any]) -> str:
    def gib(value: int | None) -> str:
        return "unknown" if value is None else f"{value / 2**30:.2f} GiB"

    lines = [
        f"model: {plan['model']} ({gib(plan['weights_on_disk'])} of weights on disk, {plan['dtype']})",
        f"blocks: {plan['blocks']} of up to {gib(plan['block_bytes'])}, {plan['layers_per_block']} layers each",
        f"Hessians per block: up to {gib(plan['hessian_bytes_per_block'])}",
        f"outside the blocks: {gib(plan['outside_blocks_bytes'])}",
        f"calibration: {plan['calibration_tokens']} tokens, activations {gib(plan['activation_bytes'])} "
        f"(kept on {plan['activations_on']})",
    ]
    for device, peak in plan["peak_bytes"].items():
        lines.append(f"expected peak on {device}: {gib(peak)} (free now: {gib(plan['available_bytes'].get(device))})")
    return "\n".join(lines)


def _streamed(args: argparse.Namespace) -> bool:
    """Whether the command holds one block in memory at a time: eval with --stream or --offload-dir, and prune
    with those, --resume or --dry-run (a sweep's --resume continues its rows, it does not stream)."""
    if args.command == "prune":
        return bool(args.stream or args.offload_dir or args.resume or args.dry_run)
    return args.command == "eval" and bool(args.stream or args.offload_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "accelerate", "lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.verbose else logging.INFO)
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    # a streamed run is about peak memory: freed memory goes back to the system there
    streamed = _streamed(args)
    if streamed:
        return_freed_memory()
    else:
        keep_freed_memory()
    try:
        code = _run(args)
        finish()
    except SparseGPTError as error:
        print(f"sparsegpt: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        resumable = args.command == "sweep" or (args.command == "prune" and streamed)
        kept = "the same command with --resume continues where it stopped" if resumable else "nothing was written"
        print(f"sparsegpt: interrupted; {kept}", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
