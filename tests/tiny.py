"""Tiny randomly initialized models of many architectures, and a tiny tokenizer, for end-to-end tests."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_config(arch: str):
    import transformers as t

    if arch == "llama":
        return t.LlamaConfig(**COMMON)
    if arch == "mistral":
        return t.MistralConfig(**COMMON, sliding_window=8)
    if arch == "qwen2":
        return t.Qwen2Config(**COMMON)
    if arch == "gemma3":
        return t.Gemma3TextConfig(
            **COMMON, head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"]
        )
    if arch == "phi3":
        return t.Phi3Config(**COMMON, pad_token_id=0)
    if arch == "opt":
        return t.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
        )
    if arch == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    if arch == "gpt_neox":
        return t.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    if arch == "bloom":
        return t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    if arch == "mixtral":
        return t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(
            **COMMON,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    raise ValueError(arch)


ARCHITECTURES = [
    "llama",
    "mistral",
    "qwen2",
    "gemma3",
    "phi3",
    "opt",
    "gpt2",
    "gpt_neox",
    "bloom",
    "mixtral",
    "qwen2_moe",
]


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer with a vocabulary of VOCAB tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100]
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def llama_folder(folder, layers: int, hidden: int = 32, intermediate: int = 64, text: str | None = None):
    """A tiny Llama of ``layers`` blocks saved with the tiny tokenizer in ``folder``/model; with ``text``,
    also ``folder``/calib.txt."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, intermediate, layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    if text is not None:
        (folder / "calib.txt").write_text(text)
    return folder


class AutocastAlone(TorchFunctionMode):
    """Stands in for ``linears.SharedInputCasts``: every call goes to torch, so under autocast each layer
    rounds its inputs itself."""

    def cast(self, inputs):
        return inputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
