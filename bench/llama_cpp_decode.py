"""llama.cpp's prefill and decode speed on a GGUF file, the outside anchor of bench/inference.py.

Runs inside the virtualenv that holds llama-cpp-python built from its source distribution (bench/README.md):
it imports neither torch nor this project. Prints JSON: prompt tokens per second (the prompt evaluated in
one batch) and new tokens per second (greedy, one token per evaluation with the KV cache), the medians of
``--rounds`` runs.

    /tmp/llamavenv/bin/python bench/llama_cpp_decode.py --gguf FILE --text FILE [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llama_cpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--text", required=True, help="a text file; its first --prompt-tokens tokens are the prompt")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    context = args.prompt_tokens + args.new_tokens + 8
    model = llama_cpp.Llama(  # one batch as long as the context: the prompt in one evaluation, and a row of
        model_path=args.gguf,  # `scores` (n_batch of them) for every position's logits
        n_ctx=context,
        n_batch=context,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    with open(args.text, encoding="utf-8") as handle:
        prompt = model.tokenize(handle.read().encode(), add_bos=False)[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        raise SystemExit(f"{args.text} holds {len(prompt)} tokens, fewer than --prompt-tokens {args.prompt_tokens}")
    prefill, decode = [], []
    for _ in range(args.rounds):
        model.reset()
        started = time.perf_counter()
        model.eval(prompt)
        token = int(model.scores[model.n_tokens - 1].argmax())
        prefilled = time.perf_counter()
        for _ in range(args.new_tokens - 1):  # greedy, whatever the token (end of text included)
            model.eval([token])
            token = int(model.scores[model.n_tokens - 1].argmax())
        finished = time.perf_counter()
        prefill.append(args.prompt_tokens / (prefilled - started))
        decode.append((args.new_tokens - 1) / (finished - prefilled))
    print(
        json.dumps(
            {
                "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                "threads": args.threads,
                "prefill_tokens_per_s": statistics.median(prefill),
                "decode_tokens_per_s": statistics.median(decode),
            }
        )
    )


if __name__ == "__main__":
    main()
