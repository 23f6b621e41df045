"""Streaming: block-by-block pruning and evaluation equal the in-memory ones bit for bit, spilled
activations change nothing, and a run killed at any moment resumes to the same bytes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sparsegpt import PruneConfig, PruneResult, load_pretrained, prune_model
from sparsegpt.cli import main
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.compact import read_quant_sidecar, same_bits
from sparsegpt.perplexity import perplexity
from sparsegpt.streaming.driver import PROGRESS_NAME, partial_folder, perplexity_streamed, plan, prune_streamed

from tiny import VOCAB, llama_folder, tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 80


def windows(count, seqlen=16, seed=1):
    return torch.randint(0, VOCAB, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def assert_same_weights(first, second):
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert same_bits(a[key], b[key]), key


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    made = {}
    for arch in ("llama", "gpt2", "gpt_neox", "gemma3"):
        tiny_model(arch).save_pretrained(root / arch)
        made[arch] = root / arch
    return made


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3"])
@pytest.mark.parametrize(
    "config",
    [
        PruneConfig(sparsity=0.5, nsamples=6, seqlen=16, batch_size=2),
        PruneConfig(method="wanda", pattern=None, sparsity=0.5, nsamples=6, seqlen=16, batch_size=4),
        PruneConfig(method="magnitude", sparsity=0.5),
    ],
    ids=["sparsegpt", "wanda", "magnitude"],
)
def test_streamed_prune_and_perplexity_equal_in_memory(folders, tmp_path, arch, config):
    calibration = windows(6) if config.needs_calibration else None
    expected = load_pretrained(folders[arch])
    records = prune_model(expected, config, calibration)
    run = prune_streamed(folders[arch], tmp_path / "out", config, calibration)
    assert [record.to_dict() | {"seconds": 0} for record in run.layers] == [
        record.to_dict() | {"seconds": 0} for record in records
    ]
    streamed = load_pretrained(tmp_path / "out")
    assert_same_weights(streamed, expected)
    scored = windows(5, seed=2)
    assert perplexity_streamed(tmp_path / "out", scored, batch_size=2) == perplexity(streamed, scored, batch_size=2)
    assert not partial_folder(tmp_path / "out").exists()
    assert not any(path.name.startswith(("activations-", "grids-", PROGRESS_NAME)) for path in run.out.iterdir())


def test_quantized_stream_writes_the_grids_in_memory_saving_writes(folders, tmp_path):
    config = PruneConfig(sparsity=0.5, nsamples=6, seqlen=16, batch_size=3, bits=4, group_size=16)
    calibration = windows(6)
    expected = load_pretrained(folders["llama"])
    records = prune_model(expected, config, calibration)
    PruneResult(expected, None, config, records, 0.0, "tiny", None).save(tmp_path / "memory")
    prune_streamed(folders["llama"], tmp_path / "streamed", config, calibration)
    assert_same_weights(load_pretrained(tmp_path / "streamed"), expected)
    first, second = read_quant_sidecar(tmp_path / "memory"), read_quant_sidecar(tmp_path / "streamed")
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name].scales, second[name].scales) and torch.equal(
            first[name].zeros, second[name].zeros
        )
        assert first[name].transposed == second[name].transposed


def test_spilled_activations_change_nothing_and_are_cleaned_up(folders, tmp_path):
    config = PruneConfig(sparsity=0.5, nsamples=6, seqlen=16, batch_size=2)
    calibration = windows(6)
    prune_streamed(folders["gpt2"], tmp_path / "memory", config, calibration)
    spill = tmp_path / "spill"
    prune_streamed(folders["gpt2"], tmp_path / "disk", config, calibration, offload_dir=spill)
    assert_same_weights(load_pretrained(tmp_path / "disk"), load_pretrained(tmp_path / "memory"))
    assert list(spill.iterdir()) == []
    scored = windows(4, seed=3)
    assert perplexity_streamed(tmp_path / "disk", scored, offload_dir=spill) == perplexity_streamed(
        tmp_path / "disk", scored
    )
    assert list(spill.iterdir()) == []


def test_shards_and_index_are_a_normal_transformers_folder(folders, tmp_path):
    config = PruneConfig(method="magnitude", sparsity=0.5)
    run = prune_streamed(folders["gpt_neox"], tmp_path / "out", config, None)
    index = json.loads((run.out / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) == len(tiny_model("gpt_neox").gpt_neox.layers) + 1
    for shard in shards:
        with safe_open(str(run.out / shard), "pt") as handle:
            assert all(index["weight_map"][key] == shard for key in handle.keys())  # noqa: SIM118 (a safetensors handle)
    # checkpoint names are kept as the source stores them (GPT-NeoX's lm_head is stored as embed_out)
    assert "embed_out.weight" in index["weight_map"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run.out))


def test_dry_run_plan_reads_no_weights_and_refuses_what_cannot_fit(folders, tmp_path, capsys):
    summary = plan(folders["llama"], PruneConfig(nsamples=6, seqlen=16))
    assert summary["blocks"] == 2 and summary["layers_per_block"] == 7
    assert summary["hessian_bytes_per_block"] == 4 * (6 * 32 * 32 + 64 * 64)
    assert summary["peak_bytes"]["cpu"] > summary["block_bytes"]
    code = main(["-q", "prune", str(folders["llama"]), "-o", str(tmp_path / "x"), "--dry-run"])
    assert code == 0 and "expected peak on cpu" in capsys.readouterr().out
    code = main(
        ["-q", "prune", str(folders["llama"]), "-o", str(tmp_path / "x"), "--dry-run", "--nsamples", "10000000"]
    )
    captured = capsys.readouterr()
    assert code == 2 and "the plan needs about" in captured.err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_merged_on_load_stream_like_in_memory(tmp_path, arch):
    """transformers fuses these checkpoints' per-expert tensors into banks when it loads them; streaming
    applies the same conversion block by block."""
    tiny_model(arch).save_pretrained(tmp_path / "source")
    config = PruneConfig(sparsity=0.5, nsamples=6, seqlen=16, batch_size=2)
    calibration = windows(6)
    expected = load_pretrained(tmp_path / "source")
    prune_model(expected, config, calibration)
    prune_streamed(tmp_path / "source", tmp_path / "out", config, calibration)
    streamed = load_pretrained(tmp_path / "out")
    assert_same_weights(streamed, expected)
    scored = windows(4, seed=2)  # (the in-memory forward may pick another experts kernel: close, not equal)
    assert perplexity_streamed(tmp_path / "out", scored) == pytest.approx(perplexity(streamed, scored), rel=1e-6)


def test_a_compact_folder_is_refused_with_one_line(folders, tmp_path):
    from sparsegpt import pack_folder

    pack_folder(folders["llama"], tmp_path / "compact")
    with pytest.raises(SparseGPTError, match="compact folder"):
        prune_streamed(tmp_path / "compact", tmp_path / "out", PruneConfig(method="magnitude"), None)
    assert not (tmp_path / "out").exists()


# --- kill -9 and resume --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    """Eight blocks slow enough (a few tenths of a second each) to be killed in the middle of a run."""
    return llama_folder(tmp_path_factory.mktemp("deep"), layers=8, hidden=128, intermediate=768, text=TEXT)


def _command(root, out, *extra):
    return [
        sys.executable, "-m", "sparsegpt", "-q", "prune", str(root / "model"), "-o", str(out), "--stream",
        "--calib", str(root / "calib.txt"), "--nsamples", "16", "--seqlen", "64", "--batch-size", "4", *extra,
    ]  # fmt: skip


def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def uninterrupted(deep_folder):
    out = deep_folder / "uninterrupted"
    subprocess.run(_command(deep_folder, out), check=True, capture_output=True)
    return _bytes_of(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_a_random_moment_resumes_to_the_same_bytes(deep_folder, uninterrupted, tmp_path, seed):
    chance = random.Random(seed)
    after_block, delay = chance.randint(1, 6), chance.uniform(0.0, 0.3)
    out = tmp_path / "out"
    progress = partial_folder(out) / PROGRESS_NAME
    process = subprocess.Popen(_command(deep_folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["done"] >= after_block:
            break
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
        pytest.fail(f"the run ended before it could be killed (block {after_block}, delay {delay:.2f} s)")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if out.exists():  # on a fast host the kill can land after the output was moved into place: it is whole
        assert _bytes_of(out) == uninterrupted
        assert not partial_folder(out).exists()
        return
    resumed = subprocess.run(_command(deep_folder, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after block" in resumed.stdout
    assert _bytes_of(out) == uninterrupted
    assert not partial_folder(out).exists()


def test_a_partial_run_is_kept_until_resumed_with_the_same_settings_or_overwritten(
    deep_folder, uninterrupted, tmp_path
):
    out = tmp_path / "out"
    process = subprocess.Popen(_command(deep_folder, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = partial_folder(out) / PROGRESS_NAME
    while process.poll() is None and not progress.is_file():
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    refused = subprocess.run(_command(deep_folder, out), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = subprocess.run(_command(deep_folder, out, "--resume", "--sparsity", "0.6"), capture_output=True, text=True)
    assert other.returncode == 2 and "different config" in other.stderr
    resumed = subprocess.run(_command(deep_folder, out, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed after block" in resumed.stdout, resumed.stderr
    assert _bytes_of(out) == uninterrupted and not partial_folder(out).exists()
    fresh = subprocess.run(_command(deep_folder, out, "--overwrite", "--sparsity", "0.6"), capture_output=True)
    assert fresh.returncode == 0 and out.is_dir() and not partial_folder(out).exists()


def test_streaming_needs_a_model_folder(tmp_path, capsys):
    code = main(["-q", "prune", str(tmp_path / "nothing"), "-o", str(tmp_path / "x"), "--stream"])
    assert code == 2 and "local transformers folder" in capsys.readouterr().err


@pytest.mark.parametrize("band_bytes", [1, 100, 2**20])
def test_rows_of_a_stored_tensor_are_read_band_by_band(tmp_path, band_bytes):
    from sparsegpt.formats.shards import read_header, read_rows, write_safetensors

    table = torch.randn(37, 6)
    write_safetensors({"table": table}, tmp_path / "t.safetensors")
    start, header = read_header(tmp_path / "t.safetensors")
    for rows in ([0], [36], [3, 4, 5, 30], list(range(37))):
        got = read_rows(tmp_path / "t.safetensors", start, "table", header["table"], torch.tensor(rows), band_bytes)
        assert torch.equal(got, table[rows])


def test_a_streamed_prune_never_reads_the_whole_embedding_before_it_writes_it(tmp_path, monkeypatch):
    from sparsegpt.streaming.weights import WeightSource

    model = tiny_model("llama")
    model.config.pad_token_id = VOCAB - 1  # a padding row the calibration never reads (Qwen's is its last)
    model.model.embed_tokens.padding_idx = VOCAB - 1
    model.save_pretrained(tmp_path / "model")
    calibration = windows(4) % 10
    whole = []
    original = WeightSource.read
    monkeypatch.setattr(WeightSource, "read", lambda self, name: whole.append(name) or original(self, name))
    config = PruneConfig(nsamples=4, seqlen=16)
    prune_streamed(tmp_path / "model", tmp_path / "out", config, calibration)
    assert whole.count("model.embed_tokens.weight") == 1  # once: written into the output at the end
    prune_model(model, config, calibration)
    assert_same_weights(load_pretrained(tmp_path / "out"), model)
