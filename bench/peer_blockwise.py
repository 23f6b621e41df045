"""Layer by layer: does our solver reproduce a peer's pruned weights when both see the same inputs?

A whole-model perplexity compares two pipelines after 30 blocks of compounding rounding; this script
isolates one layer at a time. It walks the dense model block by block on the given calibration windows,
accumulates each layer's Hessian with our observer, solves the layer with our SparseGPT, and compares
that solution with the peer's saved weights for the same layer: the relative output error of both under
the same Hessian, and the share of mask positions on which they agree. It then installs the *peer's*
weights before computing the block's outputs, so every block sees exactly the inputs the peer's pruned
model gives it.

    python bench/peer_blockwise.py --peer DIR --calib-tokens FILE.pt [--pattern 2:4] [--sparsity 0.5]

Prints one line per layer and a summary line (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import sparsegpt
from sparsegpt.models import find_blocks
from sparsegpt.pipeline import advance_block, capture_block_inputs, observe_block
from sparsegpt.solver import NMPattern, relative_output_error, sparsegpt_prune


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the dense model the peer started from")
    parser.add_argument("--peer", type=Path, required=True, help="the peer's pruned transformers folder")
    parser.add_argument("--calib-tokens", type=Path, required=True, help="(nsamples, seqlen) int64 .pt")
    parser.add_argument("--pattern", default=None, help="N:M, as given to the peer")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    pattern = NMPattern.parse(args.pattern) if args.pattern else None
    model, _, _ = sparsegpt.load_model(args.model)
    peer = dict(AutoModelForCausalLM.from_pretrained(args.peer, dtype=torch.float32).named_parameters())
    batches = list(torch.load(args.calib_tokens).split(args.batch_size))
    blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, batches)
    ratios, agreements = [], []
    for block, block_calls in zip(blocks, calls):
        statistics = observe_block(block, block.weights, hidden, block_calls, torch.device("cpu"))
        for weight in block.weights:
            hessian = statistics[weight.name].hessian()
            dense = weight.matrix().detach().clone()
            ours = sparsegpt_prune(dense, hessian, args.sparsity, pattern).weight
            theirs = peer[weight.name + ".weight"].detach()
            ours_error = relative_output_error(dense, ours, hessian)
            peer_error = relative_output_error(dense, theirs, hessian)
            agreement = float(((ours == 0) == (theirs == 0)).float().mean())
            ratios.append(peer_error / ours_error)
            agreements.append(agreement)
            print(
                f"{weight.name:40s} error ours {ours_error:.5f} peer {peer_error:.5f} "
                f"peer/ours {ratios[-1]:.4f} mask agreement {agreement:.5f}",
                flush=True,
            )
            weight.write(theirs.clone())
        advance_block(block, hidden, block_calls)
    summary = {
        "layers": len(ratios),
        "peer_over_ours_error": {"min": min(ratios), "max": max(ratios)},
        "mask_agreement_min": min(agreements),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
