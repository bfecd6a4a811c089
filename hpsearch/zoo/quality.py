"""Check that the embedded model reacts to compression like an LLM (CPU, float32).

    python -m hpsearch.zoo.quality [--dir DIR] [--max-tokens N] [--json PATH]

Measures on the ``test`` split (512-token blocks): the model's perplexity, the perplexity of a
unigram model fitted on the ``train`` split's tokens (add-one smoothing) on the same predicted
tokens, the perplexity after uniform round-to-nearest weight quantisation of every ``nn.Linear``
inside the decoder blocks (asymmetric min-max, group size 128; embeddings and ``lm_head`` kept),
and the CPU time of one forward pass over 32x256 tokens. The requirements it checks:

- model perplexity <= unigram perplexity / 3;
- RTN 2-bit at least doubles the perplexity;
- RTN 8-bit changes it by at most 1%.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

from hpsearch.zoo import EMBEDDED_DIR, load_files
from hpsearch.zoo.train import blocks, pack, perplexity


def rtn(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Fake-quantise ``w`` [out, in] with asymmetric min-max round-to-nearest per input group."""
    out_features, in_features = w.shape
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    qmax = 2**bits - 1
    w_min, w_max = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((w_max - w_min) / qmax).clamp(min=1e-8)
    zero = torch.round(-w_min / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
    return ((q - zero) * scale).reshape(out_features, in_features).to(w.dtype)


@torch.no_grad()
def quantize_blocks_(model, bits: int, group_size: int = 128) -> None:
    """Apply :func:`rtn` in place to every ``nn.Linear`` inside ``model.model.layers``."""
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(rtn(module.weight, bits, group_size))


def unigram_perplexity(train_ids: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``targets`` of add-one-smoothed unigram frequencies of ``train_ids``."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return math.exp(-logp[targets].mean().item())


def load(directory: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return tokenizer, model.eval()


def measure(directory: pathlib.Path, max_tokens: int = 0, bits=(8, 4, 3, 2)) -> dict:
    tokenizer, model = load(directory)
    test = blocks(pack(tokenizer, list(load_files("test").values())), 512)
    if max_tokens:
        test = test[:max(1, max_tokens // 512)]
    train_ids = pack(tokenizer, list(load_files("train").values()))
    result = {"test_tokens": test.numel(),
              "unigram_ppl": unigram_perplexity(train_ids, test[:, 1:].flatten(), len(tokenizer))}
    x = torch.randint(len(tokenizer), (32, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=x)
        t0 = time.perf_counter()
        model(input_ids=x)
    result["forward_32x256_s"] = time.perf_counter() - t0
    result["torch_threads"] = torch.get_num_threads()
    result["ppl"] = perplexity(model, test, 32, "cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for b in bits:
        quantize_blocks_(model, b)
        result[f"rtn{b}_ppl"] = perplexity(model, test, 32, "cpu")
        model.load_state_dict(state)
    result["checks"] = {
        "ppl <= unigram/3": result["ppl"] <= result["unigram_ppl"] / 3,
        "rtn2 >= 2x": result.get("rtn2_ppl", math.inf) >= 2 * result["ppl"],
        "rtn8 within 1%": abs(result.get("rtn8_ppl", math.inf) / result["ppl"] - 1) <= 0.01,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpsearch.zoo.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=pathlib.Path, default=EMBEDDED_DIR)
    parser.add_argument("--max-tokens", type=int, default=0, help="cap on test tokens (0: all)")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.dir, args.max_tokens)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
