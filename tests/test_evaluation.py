"""Perplexity's scoring precision and the host measurement that "auto" choices rest on."""

import json

import pytest
import torch

import sparsegpt
from sparsegpt import Evaluation, host, perplexity, pipeline
from sparsegpt.errors import SparseGPTError
from sparsegpt.host import MatmulRates, fast_bfloat16, fast_split_bfloat16, float32_linears, matmul_rates
from sparsegpt.linears import OneDnnLinears, onednn_agrees
from sparsegpt.perplexity import SplitBfloat16Linears, resolve_eval_precision, scoring_precision
from sparsegpt.solver.gram import native_mixed_gram

from tiny import VOCAB, AutocastAlone, tiny_model

CPU = torch.device("cpu")
MIXED = native_mixed_gram(torch.bfloat16)
needs_mixed = pytest.mark.skipif(not MIXED, reason="torch's library has no MKL bf16 x bf16 -> fp32 product here")


def windows(count=4, length=24, seed=0):
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def test_host_rates_are_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def measure(*args, **kwargs):
        calls.append(1)
        return MatmulRates(100.0, 400.0, 200.0)

    monkeypatch.setattr(host, "measure_matmul_rates", measure)
    assert matmul_rates(tmp_path) == MatmulRates(100.0, 400.0, 200.0) and len(calls) == 1
    assert matmul_rates(tmp_path) == MatmulRates(100.0, 400.0, 200.0) and len(calls) == 1  # from the file
    stored = json.loads((tmp_path / host.RATES_FILE).read_text())
    assert list(stored) == [host.host_key()]
    assert stored[host.host_key()] == {
        "float32": 100.0,
        "bfloat16": 400.0,
        "split_bfloat16": 200.0,
        "mkl_mixed": 0.0,
        "native_mixed": 0.0,
        "onednn_float32": 0.0,
        "mkl_gram_float32": 0.0,
        "native_gram_float32": 0.0,
        "attention_float32": 0.0,
        "attention_bfloat16": 0.0,
        "attention_native": 0.0,
        "step_float32": 0.0,
        "step_bfloat16": 0.0,
        "step_native": 0.0,
        "step_native_bfloat16": 0.0,
    }
    assert fast_bfloat16(CPU, tmp_path) and fast_split_bfloat16(CPU, tmp_path) == MIXED
    (tmp_path / host.RATES_FILE).write_text("{not json")  # a damaged cache is measured anew
    monkeypatch.setattr(host, "measure_matmul_rates", lambda *a, **k: MatmulRates(100.0, 120.0, 110.0))
    assert not fast_bfloat16(CPU, tmp_path) and not fast_split_bfloat16(CPU, tmp_path)  # below 1.5x: not worth it
    assert json.loads((tmp_path / host.RATES_FILE).read_text())[host.host_key()]["bfloat16"] == 120.0
    old = {host.host_key(): {"float32": 1.0, "bfloat16": 2.0}}  # an entry without every rate: measured again
    (tmp_path / host.RATES_FILE).write_text(json.dumps(old))
    assert matmul_rates(tmp_path) == MatmulRates(100.0, 120.0, 110.0)


def test_host_rates_measure_real_products():
    rates = host.measure_matmul_rates((64, 32, 48), repeats=2)
    assert rates.float32 > 0 and rates.bfloat16 > 0 and rates.split_bfloat16 > 0
    assert torch.__version__ in host.host_key() and f"{torch.get_num_threads()} threads" in host.host_key()


def test_onednn_linears_give_the_float32_product():
    assert onednn_agrees()  # torch's CPU builds carry oneDNN
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 40, generator=generator), torch.randn(24, generator=generator)
    for inputs in (torch.randn(7, 40, generator=generator), torch.randn(2, 5, 40, generator=generator)[:, ::2]):
        expected = inputs.double() @ weight.double().T
        with OneDnnLinears():
            out = torch.nn.functional.linear(inputs, weight)
            with_bias = torch.nn.functional.linear(inputs, weight, bias)
            double = torch.nn.functional.linear(inputs.double(), weight.double())  # not float32: torch's own
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(with_bias.double(), expected + bias.double(), rtol=1e-5, atol=1e-5)
        assert double.dtype == torch.float64 and torch.equal(
            double, torch.nn.functional.linear(inputs.double(), weight.double())
        )
    trained = torch.nn.Parameter(weight.clone())
    with OneDnnLinears():
        torch.nn.functional.linear(torch.randn(3, 40), trained).sum().backward()  # gradients: torch's own
    assert trained.grad is not None and trained.grad.shape == weight.shape


def test_float32_linears_follow_the_measured_rates(tmp_path, monkeypatch):
    for onednn, chosen in ((200.0, True), (110.0, False), (0.0, False)):  # 1.15x over torch's float32 or more
        rates = MatmulRates(100.0, 400.0, 200.0, onednn_float32=onednn)
        monkeypatch.setattr(host, "measure_matmul_rates", lambda *a, rates=rates, **k: rates)
        (tmp_path / host.RATES_FILE).unlink(missing_ok=True)
        assert host.fast_onednn_float32(tmp_path) == chosen
        assert rates.best_float32 == (onednn if chosen else 100.0)
        assert rates.bfloat16_speedup == 400.0 / rates.best_float32  # bf16 must beat the faster float32
    monkeypatch.setattr(host, "fast_onednn_float32", lambda cache=None: True)
    assert isinstance(float32_linears(CPU), OneDnnLinears)
    assert not isinstance(float32_linears(torch.device("meta")), OneDnnLinears)
    monkeypatch.setattr(host, "fast_onednn_float32", lambda cache=None: False)
    assert not isinstance(float32_linears(CPU), OneDnnLinears)


def test_the_faster_measured_backend_multiplies(tmp_path, monkeypatch):
    from sparsegpt.solver import gram

    for mkl, native in ((100.0, 300.0), (300.0, 100.0)):
        rates = MatmulRates(1.0, 1.0, 1.0, mkl, native, 0.0, mkl, native)
        monkeypatch.setattr(host, "measure_matmul_rates", lambda *a, rates=rates, **k: rates)
        (tmp_path / host.RATES_FILE).unlink(missing_ok=True)
        for dtype in (torch.bfloat16, torch.float32):
            expected = ("native" if native > mkl else "mkl") if gram.native_available(dtype) else "mkl"
            assert host.product_backend(dtype, tmp_path) == expected
    assert host.product_backend(torch.float16, tmp_path) == "mkl"  # no native kernel: nothing measured


def test_auto_scores_float32_models_in_bfloat16_only_where_the_host_is_fast(monkeypatch):
    model = tiny_model("llama")
    for fast in (True, False):
        monkeypatch.setattr(perplexity, "fast_split_bfloat16", lambda device, fast=fast: fast)
        assert resolve_eval_precision("auto", model) == ("split-bfloat16" if fast else None)
        assert resolve_eval_precision("auto", tiny_model("llama", torch.bfloat16)) is None  # its own is fast
        assert resolve_eval_precision("model", model) is None
        assert resolve_eval_precision("bfloat16", model) == "bfloat16"
        if MIXED:
            assert resolve_eval_precision("split-bfloat16", model) == "split-bfloat16"
    with pytest.raises(SparseGPTError, match="unknown evaluation precision 'fp8'"):
        resolve_eval_precision("fp8", model)
    with pytest.raises(SparseGPTError, match="unknown evaluation precision 'fp8'"):
        Evaluation("sotu:test", 512, precision="fp8")


@needs_mixed
def test_split_products_round_only_the_inputs():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 5, 40, generator=generator)
    weight = torch.nn.Parameter(torch.randn(24, 40, generator=generator), requires_grad=False)
    bias = torch.randn(24, generator=generator)
    rounded = inputs.bfloat16().double()
    expected = rounded @ weight.double().T + bias.double()
    terms = rounded.abs() @ weight.double().abs().T
    with SplitBfloat16Linears():
        out = torch.nn.functional.linear(inputs, weight, bias)
        assert out.dtype == torch.float32 and out.shape == (3, 5, 24)
        # hi + lo holds about 16 bits of each weight; products exact, sums in float32
        assert ((out.double() - expected).abs() <= 2.0**-15 * terms + 1e-6).all()
        assert not torch.equal(
            out, torch.nn.functional.linear(inputs.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
        )
        with torch.no_grad():
            weight.mul_(2)  # changed in place: split again
        assert torch.allclose(torch.nn.functional.linear(inputs, weight), 2 * (out - bias), rtol=1e-4, atol=1e-4)
        scratch = weight.detach().clone()  # not a parameter (a reused buffer): torch's own product
        assert torch.equal(torch.nn.functional.linear(inputs, scratch), inputs @ scratch.T)


def test_bfloat16_scoring_keeps_the_output_layer_in_float32(monkeypatch):
    model = tiny_model("llama")
    batch = windows()
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    decoder_dtypes = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, output: decoder_dtypes.append(output.dtype))
    exact = perplexity.perplexity(model, batch)
    fast = perplexity.perplexity(model, batch, precision="bfloat16")
    assert seen == [(torch.float32, torch.float32)] * 2 and decoder_dtypes == [torch.float32, torch.bfloat16]
    assert fast != exact and fast == pytest.approx(exact, rel=0.01)
    assert "forward" not in vars(head)  # the class's forward again
    with scoring_precision(model, None):  # nothing to change
        assert perplexity.perplexity(model, batch) == exact
    linears = []

    class Alone(AutocastAlone):  # and proof that bf16 scoring goes through the shared roundings' mode
        def __torch_function__(self, func, types, args=(), kwargs=None):
            linears.append(func is torch.nn.functional.linear)
            return super().__torch_function__(func, types, args, kwargs)

    monkeypatch.setattr(pipeline, "SharedInputCasts", Alone)
    assert perplexity.perplexity(model, batch, precision="bfloat16") == fast  # shared roundings change nothing
    assert any(linears)


def test_reports_name_the_precision_they_were_scored_in(monkeypatch, tmp_path):
    from tiny import tiny_tokenizer

    monkeypatch.setattr(perplexity, "fast_split_bfloat16", lambda device: MIXED)
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    evaluations = [
        Evaluation(str(tmp_path / "text.txt"), 16, 4),
        Evaluation(str(tmp_path / "text.txt"), 16, 4, "model"),
    ]
    config = sparsegpt.PruneConfig(method="magnitude")
    result = sparsegpt.prune((model, tokenizer), config, None, evaluations[:1])
    assert result.report()["eval_precision"] == {"text.txt": "split-bfloat16" if MIXED else "model"}
    _, value = sparsegpt.evaluate(result.model, tokenizer, evaluations[0])
    assert value == result.ppl["text.txt"]
    _, exact = sparsegpt.evaluate(result.model, tokenizer, evaluations[1])
    assert (exact != value) == MIXED and exact == pytest.approx(value, rel=0.01)


@pytest.mark.real
@pytest.mark.parametrize("source", ["sotu:train", "enwiki"])
def test_long_texts_tokenize_in_pieces_to_the_ids_of_the_whole(source, monkeypatch):
    from sparsegpt import assets, data
    from sparsegpt.loading import load_tokenizer

    tokenizer = load_tokenizer(str(assets.model_folder("smollm2-135m")))
    text = data.load_text(source, data.CALIBRATION)
    whole = torch.tensor(tokenizer(text.content, return_attention_mask=False, verbose=False)["input_ids"])
    monkeypatch.setattr(data, "TOKENIZE_PIECE", 1 << 16)  # many cuts
    assert len(data._cuts(text.content, tokenizer)) > 5
    assert torch.equal(data.tokenize(text, tokenizer), whole)


@pytest.mark.parametrize("prefix_space", [False, True])
def test_pieces_are_cut_only_where_the_ids_stay_those_of_the_whole(monkeypatch, prefix_space):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparsegpt import data

    # a byte-level BPE that (with prefix_space) adds a space before a text that does not start with one: a
    # piece starting with a word would then tokenize differently from the whole
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the quick brown fox.", "the lazy dog jumps."] * 10, trainer)
    backend.post_processor = None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    text = data.Text("tiny", ("the quick brown fox.\n\n  the lazy dog jumps.\n\n" * 400).strip())
    monkeypatch.setattr(data, "TOKENIZE_PIECE", 1 << 10)
    whole = torch.tensor(tokenizer(text.content)["input_ids"])
    assert torch.equal(data.tokenize(text, tokenizer), whole)
    cuts = data._cuts(text.content, tokenizer)
    # with the added space, only cuts before a text that starts with a space keep the ids
    assert cuts and all(text.content[cut] == " " for cut in cuts) == prefix_space
