"""The real default model (smollm2-135m) and texts, fetched into the cache by `make test`'s setup."""

import pytest
import torch

import sparsegpt
from sparsegpt import Evaluation, PruneConfig
from sparsegpt.models import find_blocks
from sparsegpt.solver import NMPattern, pruned_count

pytestmark = pytest.mark.real

SMALL = dict(nsamples=8, seqlen=256)
EVAL = [Evaluation("sotu:test", seqlen=512, windows=4)]


@pytest.fixture(scope="module")
def dense():
    model, tokenizer, _ = sparsegpt.load_model("smollm2-135m")
    return model, tokenizer, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def fresh(dense):
    model, tokenizer, state = dense
    model.load_state_dict(state)
    return model, tokenizer


def test_default_model_is_the_dequantized_smollm2(dense):
    model, tokenizer, _ = dense
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert len(find_blocks(model)) == 30 and model.config.hidden_size == 576
    assert tokenizer("The").input_ids[0] != tokenizer.bos_token_id  # no BOS added, as configured


def test_dense_perplexity_matches_the_recorded_value(dense):
    _, value = sparsegpt.evaluate(*fresh(dense), EVAL[0])
    assert value == pytest.approx(23.114, rel=0.002)  # first 4 windows; all 314: docs/RESULTS.md


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
def test_sparsegpt_beats_magnitude_and_round_trips_through_disk(dense, pattern, tmp_path):
    dense_zeros = {name: int((tensor == 0).sum()) for name, tensor in dense[2].items()}
    result = sparsegpt.prune(fresh(dense), PruneConfig(pattern=pattern, **SMALL), "sotu:train", EVAL)
    for block in find_blocks(result.model):
        for weight in block.weights:
            zeros = weight.matrix() == 0
            # The Q4_1 checkpoint has exact zeros of its own; one may be kept (e.g. in column 0, which no
            # update reaches), so a layer can hold a few more zeros than the pruned count, never fewer.
            assert 0 <= int(zeros.sum()) - pruned_count(0.5, zeros.numel()) <= dense_zeros[f"{weight.name}.weight"]
            if pattern is not None:
                assert torch.all(zeros.view(zeros.shape[0], -1, 4).sum(dim=2) >= 2), weight.name
    result.save(tmp_path / "pruned")
    reloaded, tokenizer, _ = sparsegpt.load_model(str(tmp_path / "pruned"))
    assert sparsegpt.evaluate(reloaded, tokenizer, EVAL[0])[1] == pytest.approx(result.ppl["sotu:test"], rel=1e-6)
    # the plain folder through the sparse runtime (encoded while loading): the same perplexity
    sparse, _, _ = sparsegpt.load_model(str(tmp_path / "pruned"), runtime="sparse")
    assert sparsegpt.evaluate(sparse, tokenizer, EVAL[0])[1] == pytest.approx(result.ppl["sotu:test"], rel=1e-3)
    magnitude = sparsegpt.prune(fresh(dense), PruneConfig(method="magnitude", pattern=pattern), None, EVAL)
    assert result.ppl["sotu:test"] * 1.5 < magnitude.ppl["sotu:test"]


def test_enwiki_is_plain_article_text():
    text = sparsegpt.data.load_text("enwiki").content
    assert len(text) > 1_000_000
    assert "[[" not in text and "{{" not in text and "#REDIRECT" not in text.upper()


def test_joint_4_bit_prune_saves_compact_and_loads_back_exactly(dense, tmp_path):
    from safetensors import safe_open

    from sparsegpt.formats.compact import read_manifest, same_bits

    config = PruneConfig(bits=4, group_size=128, **SMALL)  # 576 inputs: four groups of 128 and one of 64
    result = sparsegpt.prune(fresh(dense), config, "sotu:train", EVAL)
    result.model.to(torch.bfloat16)
    result.save(tmp_path / "plain")
    result.save(tmp_path / "compact", compact_format=True)
    manifest = read_manifest(tmp_path / "compact")
    linear = [entry for key, entry in manifest["tensors"].items() if ".layers." in key and key.endswith("proj.weight")]
    assert len(linear) == 30 * 7 and all(entry["quant"]["bits"] == 4 for entry in linear)
    dense_bytes = sum(torch.Size(entry["shape"]).numel() * 2 for entry in linear)
    assert sum(entry["bytes"] for entry in linear) <= 0.21 * dense_bytes
    loaded = sparsegpt.load_pretrained(tmp_path / "compact")
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            assert same_bits(loaded.state_dict()[key], handle.get_tensor(key)), key
    decoded = sparsegpt.load_pretrained(tmp_path / "compact", "float32")
    _, value = sparsegpt.evaluate(decoded, dense[1], EVAL[0])
    assert value < 2 * result.ppl["sotu:test"]
    # run from the compact form: the decoded model's perplexity, and in fp32 its greedy tokens
    sparse = sparsegpt.load_pretrained(tmp_path / "compact", "float32", runtime="sparse")
    assert sparsegpt.evaluate(sparse, dense[1], EVAL[0])[1] == pytest.approx(value, rel=1e-3)
    prompt = dense[1]("The state of the union is", return_tensors="pt").input_ids
    options = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(decoded.generate(prompt, **options), sparse.generate(prompt, **options))
