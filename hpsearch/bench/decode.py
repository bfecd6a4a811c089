"""Decode tokens/s of a 7B-shaped Llama at float16 and with packed 4-bit linears, on a CUDA GPU.

``python -m hpsearch.bench decode [--layers 32] [--context 256] [--kv-heads 32] [--tokens 64] [--batch 1] [--repeats 5]
[--bits 4] [--group-size 128] [--compile] [--graphs trees|manual] [--siblings fused|separate] [--mlp gated|separate]
[--rope fused|separate] [--mask auto|additive|boolean] [--lm-head fp16|packed]
[--attention auto|cudnn|efficient|math|hpsearch] [--inductor-pdl on|off] [--inductor-combo on|off] [--profile]``

The model is ``transformers.LlamaForCausalLM`` with Llama-2-7B's shapes (hidden 4096, MLP 11008,
32 heads, 32 blocks, vocabulary 32000), random-initialised in float16 on the GPU (no download).
One decode step (``--batch`` sequences, default 1, a ``StaticCache``, greedy next tokens fed back in place) is captured as one
``torch.cuda.CUDAGraph`` and replayed by hand: the eager step, or with ``--compile`` the
``torch.compile``'d one (Inductor fuses the small elementwise kernels). ``--compile --graphs trees``
uses torch.compile's own CUDA graph trees (``mode="reduce-overhead"``) instead, whose host work per
step shows in a fast model's time (the packed model: 383.6 against 390.4 tok/s replayed by hand,
kernels/NOTES.md run 28). After a prompt of ``--context`` tokens and warm-up,
tokens/s is the median over ``--repeats`` of ``--tokens`` graph replays timed with CUDA events,
each repeat decoding positions ``context .. context + tokens`` again (the cache is rewound).
``--attention`` picks the SDPA backend of both models (``auto``: PyTorch's choice), or
``hpsearch``: both models decode with :func:`hpsearch.kernels.use_decode_attention`'s split-KV
kernel (prefill stays on PyTorch's choice of SDPA backend).
``--inductor-pdl on`` lets Inductor's own kernels use programmatic dependent launch (both models
alike; kernels/NOTES.md run 13); ``--profile`` prints each model's step kernels by GPU time.
The packed model then replaces every decoder-block linear by a
:class:`hpsearch.kernels.PackedLinear` built from random codes (embeddings stay float16, the LM
head too unless ``--lm-head packed``) and is timed the same way; with ``--siblings fused`` (the
default) the packed layers that read one input (q/k/v, gate/up) then run as one launch each
(:func:`hpsearch.kernels.fuse_packed_siblings`), as the measured-latency objective times them, and
with ``--mlp gated`` (the default with fused siblings) the gate/up launch leaves ``silu(gate) * up`` itself
(:func:`hpsearch.kernels.fuse_gated_mlps`), and with ``--rope fused`` (the default with fused siblings)
the q/k/v launch of a decode step rotates the query and key and writes the key and value into the
static cache itself (:func:`hpsearch.kernels.fuse_rope_attention`), which also has SDPA's mask built
additive once a step (:func:`hpsearch.kernels.use_additive_mask`). ``--mask additive`` gives the
float16 model additive masks too (a control), ``--mask boolean`` keeps SDPA's boolean masks in both.

``fp16_bw_fraction`` is the float16 model's achieved bandwidth (bytes of weights read per token,
all but the embedding table, over the time per token) as a fraction of
the device-to-device copy bandwidth measured in the same run (bytes read + written). Needs torch,
transformers and triton only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from torch import nn


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(samples)


def llama7b_config(layers: int, kv_heads: int = 32):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=kv_heads, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(layers: int, kv_heads: int = 32) -> nn.Module:
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama7b_config(layers, kv_heads))
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def pack_block_linears(model: nn.Module, bits: int, group_size: int, seed: int = 0, lm_head: bool = False) -> int:
    """Replace every decoder-block ``nn.Linear`` (and with ``lm_head`` the LM head) by a PackedLinear
    of random codes; returns how many."""
    names = [f"model.layers.{i}.{name}" for i, block in enumerate(model.model.layers)
             for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    if lm_head:
        names.append("lm_head")
    return pack_random(model, dict.fromkeys(names, bits), group_size, seed)


def pack_random(model: nn.Module, bits_of: dict[str, int], group_size: int, seed: int = 0) -> int:
    """Replace each ``nn.Linear`` named in ``bits_of`` with fewer than 16 bits by a ``PackedLinear`` of
    random codes at its bit-width (group ``group_size``, or the whole row where it does not divide),
    for timing: a kernel's speed does not depend on the codes. Returns how many."""
    from hpsearch.kernels import PackedLinear

    count = 0
    for name, bits in bits_of.items():
        if bits >= 16:
            continue
        module = model.get_submodule(name)
        n, k = module.weight.shape
        dev = module.weight.device
        gen = torch.Generator(device=dev).manual_seed(seed + count)
        g = group_size if k % group_size == 0 else k
        q = torch.randint(0, 2**bits, (n, k), device=dev, dtype=torch.uint8, generator=gen)
        # scales of a min-max grid over N(0, 0.02) weights, so activations stay O(1)
        s = torch.full((n, k // g), 0.1 / 2**bits, device=dev, dtype=torch.float16)
        z = torch.full((n, k // g), 2 ** (bits - 1), device=dev, dtype=torch.uint8)
        bias = module.bias.data if module.bias is not None else None
        packed = PackedLinear.from_quantized(q, s, z, bits, g, bias=bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
        count += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def decode_tok_s(model: nn.Module, context: int, tokens: int, repeats: int, compile_step: bool,
                 profile: bool = False, graphs: str = "manual", batch: int = 1) -> dict[str, float]:
    """Tokens/s of greedy decoding of ``batch`` sequences with a static cache, one CUDA graph per
    step: with ``compile_step``, ``graphs="trees"`` is ``torch.compile``'s own
    (``mode="reduce-overhead"``), ``"manual"`` one ``torch.cuda.CUDAGraph`` of the compiled step.
    ``tok_s`` counts every sequence's token; ``ms_per_step`` is the time of one step of all of them."""
    from transformers import StaticCache

    from hpsearch.objectives.measured_latency import rewind_static_cache

    warmup = 3
    cache = StaticCache(config=model.config, max_cache_len=context + max(tokens, warmup) + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    step_ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")

    def rewind() -> None:  # back to the end of the prompt; the graph keeps its buffers
        rewind_static_cache(cache, context)

    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)  # prefill, allocates the cache

        def step(ids: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            return logits[:, -1:].argmax(-1)

        if compile_step and graphs == "trees":
            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

            def run_step() -> None:
                step_ids.copy_(compiled(step_ids))  # outside the graph: inputs are not mutated

            for _ in range(warmup):
                run_step()
        else:
            # one CUDA graph of the whole step, replayed with nothing else on the host: compiled (Inductor,
            # no graphs of its own) or eager
            fn = torch.compile(step, fullgraph=True) if compile_step else step
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    step_ids.copy_(fn(step_ids))  # compiles the kernels
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step_ids.copy_(fn(step_ids))
            run_step = graph.replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for i in range(repeats + 1):  # the first repeat is a warm-up
            rewind()
            start.record()
            for _ in range(tokens):
                run_step()
            end.record()
            end.synchronize()
            if i:
                samples.append(start.elapsed_time(end) / 1e3 / tokens)
        if profile:
            rewind()
            _print_profile(run_step, tokens)
    s = statistics.median(samples)
    return {"tok_s": batch / s, "ms_per_step": s * 1e3, "ms_per_token": s * 1e3 / batch}


def _set_inductor_pdl(on: bool) -> bool:
    """Ask Inductor for programmatic dependent launch (where this torch has it); whether it is on."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl") or torch.cuda.get_device_capability()[0] < 9:
        return False
    inductor_config.triton.enable_pdl = on
    return on


def _inductor_flag(name: str) -> bool:
    import torch._inductor.config as inductor_config

    return bool(getattr(inductor_config, name, False))


def _print_profile(run_step, tokens: int) -> None:
    """The kernels of ``tokens`` steps by total GPU time (stderr): where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(tokens):
            run_step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
          file=sys.stderr)


def _weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of every parameter and buffer a decode step reads: all but one row of the embedding."""
    emb = model.get_input_embeddings().weight
    seen, total = {emb.data_ptr()}, emb.shape[1] * emb.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run(args: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench decode")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=256, help="prompt tokens before timing")
    p.add_argument("--kv-heads", type=int, default=32, help="key/value heads (32: Llama-2-7B; 8: grouped-query "
                                                             "attention as Llama-3-8B's)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per timed repeat")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (1-16 rows reach the packed "
                   "kernels' few-row paths; the fused rotary and gated epilogues take one row)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="torch.compile the step (see --graphs)")
    p.add_argument("--graphs", choices=("trees", "manual"), default="manual",
                   help="with --compile: one CUDA graph of the compiled step replayed by hand (the default: no "
                        "per-step host work, as the measured-latency objective and serving engines replay "
                        'graphs), or torch.compile\'s CUDA graph trees (mode="reduce-overhead")')
    p.add_argument("--inductor-pdl", choices=("on", "off"), default="off",
                   help="with --compile: Inductor's kernels use programmatic dependent launch (sm_90+; "
                        "both models alike)")
    p.add_argument("--inductor-combo", choices=("on", "off"), default="off",
                   help="with --compile: Inductor's combo kernels, independent small kernels as one launch (the "
                        "static cache's per-layer length updates; both models alike)")
    p.add_argument("--siblings", choices=("fused", "separate"), default="fused",
                   help="packed layers that read one input (q/k/v, gate/up) as one launch, or one each")
    p.add_argument("--mlp", choices=("gated", "separate"), default=None,
                   help="gated (the default with --siblings fused): the packed model's fused gate/up GEMV "
                        "leaves silu(gate) * up (hpsearch.kernels.fuse_gated_mlps); separate: "
                        "transformers' MLP computes it")
    p.add_argument("--rope", choices=("fused", "separate"), default=None,
                   help="fused (the default with --siblings fused): the packed model's q/k/v launch rotates "
                        "the query and key and writes the static cache (hpsearch.kernels.fuse_rope_attention); "
                        "separate: transformers' attention does it")
    p.add_argument("--mask", choices=("auto", "additive", "boolean"), default="auto",
                   help="SDPA's mask: auto: as the models come (float16: boolean, converted in every layer; "
                        "packed with --rope fused: additive, built once a step); additive: both models additive; "
                        "boolean: both boolean")
    p.add_argument("--lm-head", choices=("fp16", "packed"), default="fp16",
                   help="the packed model's LM head: float16 as the float16 model's, or packed at --bits too")
    p.add_argument("--attention", choices=("auto", "cudnn", "efficient", "math", "hpsearch"), default="auto",
                   help="the SDPA backend both models use (auto: PyTorch's choice), or hpsearch: "
                        "decode steps run hpsearch::decode_attention")
    p.add_argument("--profile", action="store_true", help="also print each model's step kernels by total time (stderr)")
    a = p.parse_args(args)
    if a.kv_heads <= 0 or 32 % a.kv_heads:  # before any model is built
        p.error(f"--kv-heads must divide the 32 query heads (1, 2, 4, 8, 16 or 32), got {a.kv_heads}")
    if a.batch < 1:
        p.error(f"--batch must be at least 1, got {a.batch}")
    if a.mlp == "gated" and a.siblings == "separate":
        p.error("--mlp gated needs --siblings fused (the gate and up rows run as one launch)")
    if a.rope == "fused" and a.siblings == "separate":
        p.error("--rope fused needs --siblings fused (the q, k and v rows run as one launch)")
    if a.mask != "auto" and a.attention == "hpsearch":
        p.error("--mask additive|boolean needs SDPA (--attention hpsearch reads the boolean mask in place)")
    a.mlp = a.mlp or ("gated" if a.siblings == "fused" else "separate")
    a.rope = a.rope or ("fused" if a.siblings == "fused" else "separate")
    if not torch.cuda.is_available():
        return {"error": "needs a CUDA GPU", "device": "cpu"}
    inductor_pdl = _set_inductor_pdl(a.compile and a.inductor_pdl == "on")
    if a.compile and a.inductor_combo == "on":
        import torch._inductor.config as inductor_config

        inductor_config.combo_kernels = True
    if a.attention not in ("auto", "hpsearch"):  # only the chosen SDPA backend may run
        torch.backends.cuda.enable_cudnn_sdp(a.attention == "cudnn")
        torch.backends.cuda.enable_mem_efficient_sdp(a.attention == "efficient")
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_math_sdp(a.attention == "math")
    torch.manual_seed(0)
    bw = copy_bandwidth()
    model = build_model(a.layers, a.kv_heads)
    if a.attention == "hpsearch":  # before any compile or capture; the packed model is this one, repacked
        from hpsearch.kernels import use_decode_attention

        if not use_decode_attention(model):
            raise RuntimeError("use_decode_attention refused the model (transformers without AttentionInterface?)")
    if a.mask == "additive":
        from hpsearch.kernels import use_additive_mask

        if not use_additive_mask(model):
            raise RuntimeError("use_additive_mask refused the model (transformers without AttentionInterface?)")
    fp16_attn = model.config._attn_implementation
    fp16 = decode_tok_s(model, a.context, a.tokens, a.repeats, a.compile, profile=a.profile, graphs=a.graphs,
                        batch=a.batch)
    fp16_bytes = _weight_bytes_per_token(model)
    fp16_bw = fp16_bytes / (fp16["ms_per_step"] / 1e3)  # the weights are read once a step
    print(f"fp16: {fp16}", file=sys.stderr)
    n_packed = pack_block_linears(model, a.bits, a.group_size, lm_head=a.lm_head == "packed")
    fused, mlps, ropes = [], [], []
    example = torch.randint(0, model.config.vocab_size, (1, 4), device="cuda")
    if a.siblings == "fused":
        from hpsearch.kernels import fuse_packed_siblings

        fused = fuse_packed_siblings(model, input_ids=example)
    if a.mlp == "gated":
        from hpsearch.kernels import fuse_gated_mlps

        mlps = fuse_gated_mlps(model, input_ids=example)
    if a.rope == "fused":
        from hpsearch.kernels import fuse_rope_attention

        ropes = fuse_rope_attention(model, example)
        if not ropes:
            raise RuntimeError("fuse_rope_attention refused the model (its check failed); try --rope separate")
    if a.mask == "boolean":
        from hpsearch.kernels._additive_mask import use_boolean_mask

        use_boolean_mask(model)
    torch._dynamo.reset()
    packed = decode_tok_s(model, a.context, a.tokens, a.repeats, a.compile, profile=a.profile, graphs=a.graphs,
                          batch=a.batch)
    print(f"packed{a.bits}: {packed}", file=sys.stderr)
    packed_bytes = _weight_bytes_per_token(model)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "mode": ("manual CUDA graph of the eager step" if not a.compile else "torch.compile(reduce-overhead)"
                 if a.graphs == "trees" else "manual CUDA graph of the torch.compile'd step"),
        "inductor_pdl": inductor_pdl,
        "inductor_combo_kernels": bool(a.compile and _inductor_flag("combo_kernels")),
        # TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1: Inductor then writes its own one-row matmuls for the
        # float16 model (kernels/NOTES.md, run 27)
        "inductor_coordinate_descent_tuning": bool(a.compile and _inductor_flag("coordinate_descent_tuning")),
        "attention": a.attention,
        "fp16_attn_implementation": fp16_attn,
        "packed_attn_implementation": model.config._attn_implementation,
        "layers": a.layers,
        "batch": a.batch,
        "context": a.context,
        "kv_heads": a.kv_heads,
        "fp16_tok_s": round(fp16["tok_s"], 1),
        f"packed{a.bits}_tok_s": round(packed["tok_s"], 1),
        "speedup": round(packed["tok_s"] / fp16["tok_s"], 2),
        "fp16_bw_fraction": round(fp16_bw / bw, 3),
        "copy_bw_GBps": round(bw / 1e9, 1),
        "fp16_weight_bytes_per_token": fp16_bytes,
        f"packed{a.bits}_weight_bytes_per_token": packed_bytes,
        "bandwidth_limit_speedup": round(fp16_bytes / packed_bytes, 2),
        "packed_linears": n_packed,
        "fused_sibling_groups": len(fused),
        "gated_mlps": len(mlps),
        "rope_attention": len(ropes),
        "lm_head": a.lm_head,
    }
