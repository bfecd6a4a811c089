"""``packed_gated_matmul`` and gated MLPs under ``TRITON_INTERPRET=1`` (run as a script, in a fresh
process: the interpreter must be chosen before triton compiles anything); the GPU and CPU tests
import its models and decoding loop.

Prints one JSON object: case id -> relative error against the unfused steps (or the error message).
"""

from __future__ import annotations

import json
import sys

import torch

# (gate + up rows, K, group size): K not a multiple of the tile, per-channel groups, rows past a tile
OP_SHAPES = [(40, 96, 32), (34, 320, 64), (18, 100, 100)]


def unfused(x, layer, bias=None):
    """The steps ``packed_gated_matmul`` folds, one by one (the reference it must equal)."""
    from hpsearch.kernels import gated_reference, packed_matmul

    return gated_reference(packed_matmul(x, layer.packed, bias))


def op_cases(device: str = "cpu") -> dict[str, float | str]:
    from hpsearch.kernels import PackedLinear
    from packed_cases import random_qsz, rel_err

    out: dict[str, float | str] = {}
    # the kernel's epilogue (one row, 2-4 bits, with and without bias), then the unfused fallback
    # (several rows; 8 bits)
    grid = [(bits, shape, 1, bias) for bits in (2, 3, 4) for shape in OP_SHAPES for bias in (False, True)]
    grid += [(4, OP_SHAPES[1], 3, True), (8, OP_SHAPES[0], 1, False)]
    for bits, (n, k, g), m, with_bias in grid:
        cid = f"op-b{bits}-{n}x{k}g{g}-m{m}{'-bias' if with_bias else ''}"
        try:
            q, s, z = random_qsz(n, k, g, bits, seed=bits + 7 * k + n, device=device)
            gen = torch.Generator().manual_seed(bits * 31 + m)
            bias = torch.randn(n, generator=gen).half().to(device) if with_bias else None
            layer = PackedLinear.from_quantized(q, s, z, bits, g, bias=bias)
            x = (torch.randn(m, k, generator=gen) * 4).half().to(device)
            got, ref = layer.gated(x), unfused(x, layer, bias)
            assert got.shape == ref.shape == (m, n // 2), (got.shape, ref.shape)
            out[cid] = rel_err(got, ref)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[cid] = f"{type(e).__name__}: {e}"
    return out


def tiny_model(arch: str, device: str = "cpu", layers: int = 1, hidden: int = 64, seed: int = 0):
    """A random float16 decoder of ``arch`` (llama; qwen2: q/k/v biases) with every block linear
    packed at 4 bits (random codes)."""
    from hpsearch.kernels import PackedLinear
    from packed_cases import random_qsz
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                               max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        model = AutoModelForCausalLM.from_config(cfg).to(device).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    for i, block in enumerate(model.model.layers):
        for j, (name, module) in enumerate(list(block.named_modules())):
            if isinstance(module, nn.Linear):
                n, k = module.weight.shape
                q, s, z = random_qsz(n, k, 32, 4, seed=100 * i + j, device=device)
                s = s * (8 / k**0.5)  # outputs O(1) at any width, as trained weights
                bias = module.bias.detach() if module.bias is not None else None
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, PackedLinear.from_quantized(q, s, z, 4, 32, bias=bias))
    return model


def decode_logits(model, steps: int = 2, prompt: int = 1, step_fn=None) -> torch.Tensor:
    """Greedy decoding on a static cache: the prompt's last logits, then each step's."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(3)).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 2)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        logits = [out]
        for i in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            pos = torch.tensor([prompt + i], device=device)
            call = step_fn or (lambda t, p: model(input_ids=t, past_key_values=cache, use_cache=True,
                                                  cache_position=p).logits[:, -1])
            logits.append(call(nxt, pos).clone())
    return torch.stack(logits)


def mlp_cases(device: str = "cpu") -> dict[str, float | str]:
    from hpsearch.kernels import fuse_gated_mlps, fuse_packed_siblings, unfuse_gated_mlps
    from packed_cases import rel_err

    out: dict[str, float | str] = {}
    for arch in ("llama", "qwen2"):
        try:
            model = tiny_model(arch, device)
            ref = decode_logits(model)
            example = torch.zeros(1, 1, dtype=torch.long, device=device)
            fuse_packed_siblings(model, input_ids=example)
            names = fuse_gated_mlps(model, input_ids=example)
            assert names == ["model.layers.0.mlp"] and type(model.model.layers[0].mlp).__name__.startswith("Gated")
            out[f"mlp-{arch}"] = rel_err(decode_logits(model), ref)
            assert unfuse_gated_mlps(model) == 1
            out[f"mlp-{arch}-unfused"] = rel_err(decode_logits(model), ref)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[f"mlp-{arch}"] = f"{type(e).__name__}: {e}"
    return out


def wide_tiles_table(path: str) -> None:
    """A kernel table of 32-row tiles for the tiny models' shapes: the interpreter's cost is per
    program, and the default 8-row tiles make four times as many."""
    tile = {"kind": "gemv_h2", "block_n": 32, "block_k": 128, "block_m": 1, "split_k": 1, "num_warps": 4,
            "num_stages": 1}
    with open(path, "w") as f:
        json.dump({f"1:{k}x{n}:4": tile for k in (64, 128) for n in (32, 64, 128, 256)}, f)


def print_cases(*producers) -> None:
    """Run the case producers on the tiny models' wide tiles and print their merged JSON object (the
    ``__main__`` of the interpreter case scripts)."""
    import os
    import tempfile

    table = os.path.join(tempfile.mkdtemp(), "tiles.json")
    wide_tiles_table(table)
    os.environ["HPSEARCH_KERNEL_TUNING"] = table  # read on the first launch
    cases: dict = {}
    for produce in producers:
        cases.update(produce())
    json.dump(cases, sys.stdout)


if __name__ == "__main__":
    print_cases(op_cases, mlp_cases)
