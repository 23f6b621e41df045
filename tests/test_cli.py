"""The command line on a tiny model folder: every mode end to end, and one clear line for bad input."""

import json
import re
from pathlib import Path

import pytest
import torch

from sparsegpt.cli import build_parser, main

from tiny import tiny_model, tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text(TEXT)
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text(TEXT)
    (root / "texts" / "b.txt").write_text(TEXT[::-1])
    return root


def calibration(workspace):
    """Options for a tiny calibration: four 16-token windows of the workspace's text."""
    return ["--calib", str(workspace / "calib.txt"), "--nsamples", "4", "--seqlen", "16"]


def run(capsys, *argv):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--pattern", "2:4", "--blocksize", "16"],
        ["--method", "wanda"],
        ["--method", "magnitude"],
        ["--method", "wanda", "--low-rank", "2"],
        ["--low-rank-budget", "0.2", "--low-rank-rounds", "1"],
    ],
)
def test_prune_saves_a_loadable_folder_and_report(workspace, capsys, tmp_path, extra):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    args = [
        "prune",
        str(workspace / "model"),
        "-o",
        str(out),
        *calibration(workspace),
        "--eval",
        str(workspace / "texts"),
        "--report",
        str(tmp_path / "r.json"),
    ]
    code, stdout, stderr = run(capsys, *args, *extra)
    assert code == 0, stderr
    report = json.loads((out / "sparsegpt_report.json").read_text())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert {"method", "pattern", "sparsity", "prune_seconds", "ppl", "layers", "config", "versions"} <= set(report)
    assert report["sparsity"] == pytest.approx(0.5)
    assert all(layer["sparsity"] == 0.5 for layer in report["layers"])
    assert set(report["layers"][0]) >= {"name", "shape", "sparsity", "error", "seconds"}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (reloaded.model.layers[0].mlp.down_proj.weight == 0).float().mean() == 0.5
    code, stdout, _ = run(capsys, "eval", str(out), "--data", str(workspace / "texts"), "--seqlen", "16", "--json")
    assert json.loads(stdout)["ppl"] == pytest.approx(report["ppl"]["texts"], rel=1e-5)
    assert json.loads(stdout)["eval_precision"] == report["eval_precision"]["texts"]
    assert report["eval_precision"]["texts"] in ("model", "split-bfloat16")  # auto: as this host measures
    argv = ["eval", str(out), "--data", str(workspace / "texts"), "--seqlen", "16", "--json", "--eval-precision"]
    code, stdout, _ = run(capsys, *argv, "model")
    assert json.loads(stdout)["eval_precision"] == "model"
    assert json.loads(stdout)["ppl"] == pytest.approx(report["ppl"]["texts"], rel=1e-2)


def test_compare_prints_one_table(workspace, capsys, tmp_path):
    code, stdout, stderr = run(
        capsys,
        "compare",
        str(workspace / "model"),
        "--methods",
        "dense,magnitude,sparsegpt",
        *calibration(workspace),
        "--eval",
        str(workspace / "calib.txt"),
        "--report",
        str(tmp_path / "c.json"),
    )
    assert code == 0, stderr
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense", "magnitude", "sparsegpt"]
    assert rows[0]["sparsity"] == 0 and rows[2]["sparsity"] == pytest.approx(0.5)
    assert all(row["method"] in stdout for row in rows)


def test_sweep_writes_json_table_and_plot(workspace, capsys, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, stderr = run(
        capsys,
        "sweep",
        str(workspace / "model"),
        "-o",
        str(out),
        "--sparsities",
        "0.5,0.7",
        "--patterns",
        "2:4",
        "--methods",
        "magnitude,sparsegpt,sparsegpt+owl+refine",
        "--refine",
        "5",
        *calibration(workspace),
        "--eval",
        str(workspace / "calib.txt"),
    )
    assert code == 0, stderr
    result = json.loads((out / "sweep.json").read_text())
    runs = [(row["method"], row.get("level")) for row in result["rows"]]
    assert runs[0] == ("dense", None) and len(runs) == 1 + 3 * 2 + 2  # OWL has no N:M variant
    assert result["skipped"] == [
        {"method": "sparsegpt+owl+refine", "level": "2:4", "reason": result["skipped"][0]["reason"]}
    ]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert "| sparsegpt+owl+refine |" in table and "| 0.5 | 0.7 | 2:4 |" in table and table.strip() in stdout
    row = next(row for row in result["rows"] if row["method"] == "sparsegpt" and row["level"] == "0.7")
    assert row["sparsity"] == pytest.approx(0.7, abs=1e-3)


class _Killed(Exception):
    """Stands for the process being killed: raised after the journal has kept a row."""


def test_an_interrupted_sweep_resumes_with_the_rows_it_measured(workspace, capsys, tmp_path, monkeypatch):
    from sparsegpt import api
    from sparsegpt.formats.atomic import partial_folder
    from sparsegpt.journal import ROWS_NAME, RowJournal

    def sweep(out, *extra):
        argv = ["sweep", str(workspace / "model"), "-o", str(out), "--sparsities", "0.5,0.7", "--patterns", "2:4"]
        argv += ["--methods", "magnitude,sparsegpt", *calibration(workspace), "--eval", str(workspace / "calib.txt")]
        return run(capsys, *argv, *extra)

    code, _, stderr = sweep(tmp_path / "whole")
    assert code == 0, stderr
    whole = json.loads((tmp_path / "whole" / "sweep.json").read_text())["rows"]
    assert not partial_folder(tmp_path / "whole", "rows").exists()

    out, keep = tmp_path / "cut", RowJournal.append

    def append_then_die(journal, row):
        keep(journal, row)
        if len(journal.rows) == 3:
            raise _Killed

    monkeypatch.setattr(RowJournal, "append", append_then_die)
    with pytest.raises(_Killed):
        sweep(out)
    monkeypatch.setattr(RowJournal, "append", keep)
    assert not out.exists()
    rows_file = partial_folder(out, "rows") / ROWS_NAME
    with rows_file.open("a") as sink:
        sink.write('{"method": "sparsegpt", "lev')  # the kill came in the middle of the fourth row's line

    code, _, stderr = sweep(out)
    assert code == 2 and "--resume" in stderr and stderr.count("\n") == 1, stderr
    code, _, stderr = sweep(out, "--resume", "--seed", "1")
    assert code == 2 and "different config" in stderr and stderr.count("\n") == 1, stderr

    pruned = []
    real_prune = api._prune
    monkeypatch.setattr(
        api, "_prune", lambda prepared, entry, *rest: pruned.append(entry) or real_prune(prepared, entry, *rest)
    )
    code, _, stderr = sweep(out, "--resume")
    assert code == 0, stderr
    assert len(pruned) == len(whole) - 3  # dense and the two rows kept before the kill were not measured again
    resumed = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(row["method"], row.get("level"), row["ppl"]) for row in resumed] == [
        (row["method"], row.get("level"), row["ppl"]) for row in whole
    ]
    assert not partial_folder(out, "rows").exists()


def test_only_streamed_runs_return_freed_memory(monkeypatch):
    """Streamed runs hand freed memory back to the system (their peak is the point); the rest keep it for
    speed. A sweep's --resume continues its rows in memory: it does not stream."""
    from sparsegpt import cli

    chosen = []
    monkeypatch.setattr(cli, "return_freed_memory", lambda: chosen.append("return"))
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: chosen.append("keep"))
    monkeypatch.setattr(cli, "_run", lambda args: 0)
    cases = {
        ("prune", "m", "-o", "o"): "keep",
        ("prune", "m", "-o", "o", "--stream"): "return",
        ("prune", "m", "-o", "o", "--resume"): "return",
        ("prune", "m", "-o", "o", "--dry-run"): "return",
        ("eval", "m", "--data", "t"): "keep",
        ("eval", "m", "--data", "t", "--offload-dir", "d"): "return",
        ("sweep", "m", "-o", "o"): "keep",
        ("sweep", "m", "-o", "o", "--resume"): "keep",
    }
    for argv, expected in cases.items():
        chosen.clear()
        assert main(["-q", *argv]) == 0
        assert chosen == [expected], argv


def test_sweep_and_compare_refuse_unknown_variants(workspace, capsys, tmp_path):
    for argv in (
        ["sweep", str(workspace / "model"), "-o", str(tmp_path / "s"), "--methods", "sparsegpt+magic"],
        ["compare", str(workspace / "model"), "--methods", "wanda+refine"],
        ["compare", str(workspace / "model"), "--allocation", "owl"],
    ):
        code, _, stderr = run(capsys, *argv, *calibration(workspace))
        assert code == 2 and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "s").exists()


def bad_inputs(root):
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (root / "short.txt").write_text("the fox")
    (root / "taken").mkdir(exist_ok=True)
    (root / "taken" / "file").write_text("x")
    nan_model = tiny_model("llama")
    with torch.no_grad():
        nan_model.lm_head.weight[0, 0] = float("inf")
    nan_model.save_pretrained(root / "nan_model")
    tiny_tokenizer().save_pretrained(root / "nan_model")
    model, calib = str(root / "model"), ["--calib", str(root / "calib.txt"), "--nsamples", "2", "--seqlen", "16"]
    out = ["-o", str(root / "new_out")]
    return {
        "missing model": (["prune", str(root / "nope"), *out], "no model folder"),
        "unknown alias": (["prune", "smollm2-999m", *out], "no model folder"),
        "not a model folder": (["prune", str(root / "texts"), *out], "not a transformers model folder"),
        "missing data": (["prune", model, *out, "--calib", str(root / "none.txt")], "unknown data source"),
        "unknown source": (["prune", model, *out, "--calib", "gutenberg"], "unknown data source"),
        "sparsity too big": (["prune", model, *out, *calib, "--sparsity", "1.0"], "[0, 1)"),
        "negative sparsity": (["prune", model, *out, *calib, "--sparsity", "-0.1"], "[0, 1)"),
        "N >= M": (["prune", model, *out, *calib, "--pattern", "4:4"], "0 < N < M"),
        "width not divisible": (
            ["prune", model, *out, *calib, "--pattern", "2:3", "--blocksize", "3"],
            "not divisible",
        ),
        "short text": (["prune", model, *out, "--calib", str(root / "short.txt"), "--seqlen", "16"], "fewer than one"),
        "empty file": (["prune", model, *out, "--calib", str(root / "empty.txt")], "is empty"),
        "not utf-8": (["prune", model, *out, "--calib", str(root / "latin1.txt")], "not UTF-8"),
        "existing output": (["prune", model, "-o", str(root / "taken"), *calib], "not empty"),
        "no prunable layers": (["prune", model, *out, *calib, "--override", "*=skip"], "no prunable layers"),
        "inf in weights": (["prune", str(root / "nan_model"), *out, *calib], "NaN or Inf"),
        "bad override": (["prune", model, *out, *calib, "--override", "*=lots"], "neither a number"),
        "eval short text": (["eval", model, "--data", str(root / "short.txt"), "--seqlen", "16"], "fewer than one"),
        "unknown eval precision": (
            ["eval", model, "--data", "sotu:test", "--eval-precision", "fp8"],
            "unknown evaluation precision",
        ),
        "too many bits": (["prune", model, *out, *calib, "--bits", "9"], "between 2 and 8"),
        "rank and budget": (
            ["prune", model, *out, *calib, "--low-rank", "4", "--low-rank-budget", "0.1"],
            "not both",
        ),
        "rounds without a rank": (["prune", model, *out, *calib, "--low-rank-rounds", "2"], "give --low-rank"),
        "group without bits": (["prune", model, *out, *calib, "--group-size", "16"], "needs bits"),
        "bits with wanda": (
            ["prune", model, *out, *calib, "--bits", "4", "--method", "wanda"],
            "needs method sparsegpt",
        ),
        "group size zero": (["prune", model, *out, *calib, "--bits", "4", "--group-size", "0"], "positive integer"),
        "pack a missing folder": (["pack", str(root / "nope"), str(root / "new_out")], "no such folder"),
        "unpack a plain folder": (["unpack", model, str(root / "new_out")], "not a compact folder"),
    }


def test_bad_input_gets_one_line_and_exit_2(workspace, capsys):
    for case, (argv, message) in bad_inputs(workspace).items():
        code, stdout, stderr = run(capsys, *argv)
        assert code == 2, case
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sparsegpt: error:") and message in lines[0], (case, stderr)
        assert not (workspace / "new_out").exists(), case
    assert (workspace / "taken" / "file").read_text() == "x"


def test_overwrite_replaces_the_folder_whole(workspace, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, stderr = run(
        capsys, "prune", str(workspace / "model"), "-o", str(out), "--method", "magnitude", "--overwrite"
    )
    assert code == 0, stderr
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_quantized_compact_prune_evaluates_and_converts(workspace, capsys, tmp_path):
    out = tmp_path / "compact"
    args = ["prune", str(workspace / "model"), "-o", str(out), *calibration(workspace), "--blocksize", "16"]
    args += ["--bits", "4", "--group-size", "16", "--format", "compact", "--eval", str(workspace / "texts")]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert (out / "sparsegpt_compact.json").is_file() and not (out / "model.safetensors").exists()
    report = json.loads((out / "sparsegpt_report.json").read_text())
    assert report["config"]["bits"] == 4
    assert 0.5 <= report["sparsity"] < 0.6  # the pruned half, plus kept weights that round to zero
    code, stdout, _ = run(capsys, "eval", str(out), "--data", str(workspace / "texts"), "--seqlen", "16", "--json")
    assert code == 0 and json.loads(stdout)["ppl"] == pytest.approx(report["ppl"]["texts"], rel=1e-5)
    code, stdout, stderr = run(capsys, "unpack", str(out), str(tmp_path / "plain"))
    assert code == 0, stderr
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    assert (tmp_path / "plain" / "sparsegpt_quant.safetensors").is_file()
    code, stdout, stderr = run(capsys, "pack", str(tmp_path / "plain"), str(tmp_path / "again"))
    assert code == 0 and "sparse" in stdout, stderr
    first = (out / "sparsegpt_compact.json").read_text()
    assert json.loads((tmp_path / "again" / "sparsegpt_compact.json").read_text()) == json.loads(first)
    code, _, stderr = run(capsys, "pack", str(tmp_path / "plain"), str(tmp_path / "again"))
    assert code == 2 and "not empty" in stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["prune", "smollm2-135m", "-o", "out", "--method", "nosuch"], "invalid choice: 'nosuch'"),
        (["prune", "smollm2-135m"], "required: -o/--output"),
        (["prune", "smollm2-135m", "-o", "out", "--sparsity", "half"], "invalid float value: 'half'"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        ([], "required: command"),
    ],
)
def test_a_command_line_that_does_not_parse_gets_one_line_and_exit_2(capsys, argv, words):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.count("\n") == 1 and err.startswith("sparsegpt") and words in err and "--help" in err


def test_docs_usage_names_every_option_of_the_parser_and_no_other():
    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    reference = text[text.index("## Command line") : text.index("## Library")]
    parser = build_parser()
    subcommands = next(action for action in parser._actions if action.dest == "command").choices
    options = {flag for action in parser._actions for flag in action.option_strings}
    for name, command in subcommands.items():
        assert f"sparsegpt {name}" in reference, name
        options |= {flag for action in command._actions for flag in action.option_strings}
    options -= {"-h", "--help"}
    assert sorted(flag for flag in options if flag not in reference) == []
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", reference))
    assert sorted(documented - options - {"--help", "--nproc-per-node"}) == []  # the last is torchrun's
