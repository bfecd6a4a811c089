"""The gated epilogue and gated MLPs on a GPU: 7B shapes, eager and under torch.compile's CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from gated_cases import decode_logits, tiny_model, unfused
from hpsearch.kernels import PackedLinear, fuse_gated_mlps, fuse_packed_siblings
from packed_cases import random_qsz, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows,k,g", [(22016, 4096, 128), (28672, 4096, 128), (202, 320, 64)])
def test_gated_op_equals_unfused_steps(bits, rows, k, g):
    q, s, z = random_qsz(rows, k, g, bits, seed=rows + bits, device="cuda")
    layer = PackedLinear.from_quantized(q, s, z, bits, g)
    x = torch.randn(1, 1, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(bits),
                    dtype=torch.float16)
    got, ref = layer.gated(x), unfused(x, layer)
    assert got.shape == ref.shape == (1, 1, rows // 2)
    assert rel_err(got, ref) < 2e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gated_mlps_decode_as_transformers(arch):
    model = tiny_model(arch, device="cuda", layers=2, hidden=4096)
    ref = decode_logits(model, steps=3, prompt=7)
    example = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    fuse_packed_siblings(model, input_ids=example)
    assert fuse_gated_mlps(model, input_ids=example) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    # the epilogue equals the unfused steps to 1 ulp on a few outputs (run 26: 8 of 11008); greedy
    # decoding through two blocks carries such flips to ~2e-3 of the logits
    assert rel_err(decode_logits(model, steps=3, prompt=7), ref) < 1e-2


def test_compiled_gated_step_equals_eager():
    from transformers import StaticCache

    model = tiny_model("llama", device="cuda", layers=2, hidden=4096)
    example = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    fuse_packed_siblings(model, input_ids=example)
    fuse_gated_mlps(model, input_ids=example)
    eager = decode_logits(model, steps=4, prompt=7)
    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=7 + 4 + 2)

    def step(ids, pos):
        return model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos).logits[:, -1]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        logits = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        for i in range(4):
            pos = torch.tensor([7 + i], device="cuda")
            logits.append(compiled(logits[-1].argmax(-1, keepdim=True), pos).clone())
    assert rel_err(torch.stack(logits), eager) < 1e-2
