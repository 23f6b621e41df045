"""GGUF files converted one tensor at a time: the same weights as transformers' own whole-file loader."""

import json

import pytest
import torch

from sparsegpt import assets, gguf
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.shards import INDEX_NAME, load_safetensors

pytestmark = pytest.mark.real


def test_a_converted_gguf_holds_what_transformers_loads_from_it(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.alias_gguf("smollm2-135m")
    monkeypatch.setattr(gguf, "PIECE_BYTES", 1 << 20)  # the embedding in pieces of rows
    monkeypatch.setattr(gguf, "SHARD_BYTES", 100 << 20)  # and several shards
    out = gguf.convert_gguf(path, tmp_path / "converted")
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and [item.name for item in tmp_path.iterdir()] == ["converted"]
    ours = {name: tensor for shard in shards for name, tensor in load_safetensors(out / shard).items()}
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    expected = {name: tensor for name, tensor in theirs.state_dict().items() if name != "lm_head.weight"}
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, theirs.lm_head.weight)  # tied, as in the file
    text = "The quick brown fox"
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == tokenizer(text).input_ids


def test_a_gguf_file_that_is_not_one_gets_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SparseGPTError, match="cannot read GGUF file"):
        gguf.gguf_folder(bad, tmp_path / "cache")
    with pytest.raises(SparseGPTError, match="no such GGUF file"):
        gguf.gguf_folder(tmp_path / "absent.gguf", tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_gguf_file_prunes_streamed_and_evaluates_from_its_cached_conversion(tmp_path, monkeypatch, capsys):
    from sparsegpt.cli import main

    path = assets.alias_gguf("smollm2-135m")
    monkeypatch.setenv("SPARSEGPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text("The economy grew, and the nation prospered in peace. " * 40)
    out = tmp_path / "pruned"
    code = main(["-q", "prune", str(path), "-o", str(out), "--stream", "--method", "magnitude"])
    assert code == 0, capsys.readouterr().err
    converted = list((tmp_path / "cache" / "models" / "gguf").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith(path.stem)
    report = json.loads((out / "sparsegpt_report.json").read_text())
    assert report["streamed"] and abs(report["sparsity"] - 0.5) < 1e-6
    capsys.readouterr()
    code = main(["-q", "eval", str(path), "--data", str(tmp_path / "text.txt"), "--seqlen", "64", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["ppl"] > 1
    assert list((tmp_path / "cache" / "models" / "gguf").iterdir()) == converted  # converted once
