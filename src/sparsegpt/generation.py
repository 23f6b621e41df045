"""Text generation with transformers' ``generate``, timed: prefill (the prompt in one forward, up to the
first new token) apart from decoding (each further token, one forward with the KV cache). Attention runs
by the native kernel where the host measured it faster than torch's in the model's precision
(``host.native_attention_faster``, ``attention.native_attention_layers``): the prompt's causal attention
and each new token's over the cache."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsegpt.attention import native_attention_layers, native_available
from sparsegpt.errors import SparseGPTError
from sparsegpt.fused import fused_steps_on
from sparsegpt.host import native_attention_faster
from sparsegpt.models import decoder_blocks


@dataclass
class Generation:
    """What ``generate`` produced and how fast: tokens per second of the prompt and of the new tokens."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_speed(self) -> float:
        """Prompt tokens per second (the forward that also yields the first new token)."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_speed(self) -> float:
        """New tokens per second after the first."""
        decoded = self.new_tokens - 1
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else float("nan")


class _Clock:
    """A transformers streamer that only notes when the prompt went in and when each new token came out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    stop_at_end: bool = True,
    native_attention: bool | None = None,
) -> tuple[torch.Tensor, float, float]:
    """New token ids (1-D) for a (1, n) prompt, with the prefill and decode seconds. Greedy for
    ``temperature`` 0, else sampled at that temperature (seeded). ``stop_at_end=False`` keeps going past
    the end-of-text token, for timing a fixed number of tokens. ``native_attention``: attend by the native
    kernel (True) or by torch's (False); None: each of the prompt and the steps after it by the one the
    host probe measured faster for it. On CPU the decoder blocks' norms, gated activations and rotary
    embeddings run by the fused kernels (``fused.fused_block_steps``) where their probes agree."""
    if max_new_tokens < 1:
        raise SparseGPTError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0:
        raise SparseGPTError(f"the temperature must be 0 (greedy) or positive, not {temperature}")
    options: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        options.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    if not stop_at_end:
        options.update(min_new_tokens=max_new_tokens)
    pad = getattr(model.generation_config, "pad_token_id", None) or getattr(
        model.generation_config, "eos_token_id", None
    )
    if isinstance(pad, list):
        pad = pad[0]
    clock = _Clock()
    torch.manual_seed(seed)
    # float32 and bf16 models attend in the precision the host probe compares (float16 ones: torch's);
    # the prompt and the steps after it each by the kernel the probe measured faster for them
    measured = {torch.float32: None, torch.bfloat16: "bfloat16"}.get(model.dtype, "float16")
    if native_attention is None:
        windows = native_attention_faster(model.device, measured)
        steps = native_attention_faster(model.device, measured, step=True)
    else:
        windows = steps = native_attention and native_available()
    layers = native_attention_layers(model, windows, steps) if windows or steps else contextlib.nullcontext()
    fused = fused_steps_on(model.device, decoder_blocks(model))  # the blocks' elementwise steps
    start = time.perf_counter()
    with torch.no_grad(), layers, fused:
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), streamer=clock, pad_token_id=pad, **options
        )
    end = time.perf_counter()
    new = output[0, input_ids.shape[1] :]
    # the streamer hears the prompt first, then every new token as it is chosen
    first = clock.times[1] if len(clock.times) > 1 else end
    return new, first - start, end - first


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> Generation:
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens; returns the new text and the speeds."""
    if not prompt:
        raise SparseGPTError("the prompt is empty")
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    new, prefill, decode = generate_ids(model, input_ids, max_new_tokens, temperature, seed)
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(text, input_ids.shape[1], len(new), prefill, decode)
