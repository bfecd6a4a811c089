"""The rotary/cache epilogue and rope-fused attention on a GPU: 7B shapes, eager, under
torch.compile's CUDA graph trees and in one CUDA graph of the compiled step."""

from __future__ import annotations

import pytest
import torch
from gated_cases import decode_logits, tiny_model
from hpsearch.kernels import fuse_gated_mlps, fuse_packed_siblings, fuse_rope_attention
from packed_cases import rel_err
from rope_cases import op_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("heads", [(32, 32, 128, 4096, 128), (32, 8, 128, 4096, 128), (28, 4, 128, 3584, 128),
                                   (8, 2, 64, 576, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rope_op_equals_unfused_steps(bits, heads, with_bias):
    # Llama-2-7B, Llama-3-8B's grouping, Qwen2-7B's (K 3584), a small one whose K is no whole tile;
    # a position past the prompt
    eq, ek, ev, untouched, kernel = op_case(bits, heads, 1, with_bias, position=300, length=512, device="cuda")
    assert kernel and untouched
    # run 28 on the H100: equal to the unfused steps bit for bit
    assert max(eq, ek, ev) < 1e-3


def test_several_rows_take_the_unfused_steps():
    eq, ek, ev, untouched, kernel = op_case(4, (32, 8, 128, 4096, 128), 3, True, position=9, length=16,
                                            device="cuda")
    # the tensor-core kernel splits K with atomic float16 adds: its sums differ run to run by an ulp
    assert not kernel and untouched and max(eq, ek, ev) < 2e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_attention_decodes_as_transformers(arch):
    model = tiny_model(arch, device="cuda", layers=2, hidden=4096)
    ref = decode_logits(model, steps=3, prompt=7)
    example = torch.zeros(1, 2, dtype=torch.long, device="cuda")
    fuse_packed_siblings(model, input_ids=example)
    assert fuse_rope_attention(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    # the rotation rounds once (transformers' eager steps: three times): float16 flips carried through
    # two blocks and greedy decoding
    assert rel_err(decode_logits(model, steps=3, prompt=7), ref) < 1e-2


@pytest.mark.parametrize("graphs", ["trees", "manual"])
def test_compiled_rope_step_equals_eager(graphs):
    from transformers import StaticCache

    model = tiny_model("llama", device="cuda", layers=2, hidden=4096)
    example = torch.zeros(1, 2, dtype=torch.long, device="cuda")
    fuse_packed_siblings(model, input_ids=example)
    fuse_gated_mlps(model, input_ids=example)
    assert len(fuse_rope_attention(model)) == 2
    eager = decode_logits(model, steps=4, prompt=7)
    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=7 + 4 + 2)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3)).cuda()
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    out = torch.zeros(1, model.config.vocab_size, dtype=torch.float16, device="cuda")

    def step():  # the cache's own length gives the position: a graph replays it unchanged
        out.copy_(model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1])

    with torch.no_grad():
        logits = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        if graphs == "trees":
            run = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        else:
            compiled = torch.compile(step, fullgraph=True)
            token.copy_(logits[-1].argmax(-1, keepdim=True))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    compiled()  # compiles; the two warm-up steps are rewound below
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                compiled()
            from hpsearch.objectives.measured_latency import rewind_static_cache

            rewind_static_cache(cache, 7)
            run = graph.replay
        for _ in range(4):
            token.copy_(logits[-1].argmax(-1, keepdim=True))
            run()
            logits.append(out.clone())
    assert rel_err(torch.stack(logits), eager) < 1e-2
