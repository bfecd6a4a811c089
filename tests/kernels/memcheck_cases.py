"""Every packed kernel path on the GPU, for ``test_memcheck_gpu`` to run under compute-sanitizer with
each tensor its own allocation (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``): an access past a tensor is
then past an allocation, which memcheck reports (the caching allocator's segments hide it).

Covers the one-row kernels, the Triton tensor-core kernel, the few-row Gluon kernel (split K, one, two or
four steps ahead, activations through shared memory or not), the CUDA C kernel (warps, depths), the skinny Gluon kernel (row tiles, warps, steps loaded together, split K), 2/3/4/8 bits with groups of 32 to a whole row and K off the tile, and a small
Llama's and Qwen2's fused decode (siblings, gated MLP, rotary + cache write) at one and four sequences.
Prints ``done`` at the end.
"""

from __future__ import annotations

import itertools

import torch


def main() -> None:
    from hpsearch.kernels import KernelConfig, pack, packed_matmul
    from packed_cases import random_qsz

    # (N, K, group): 32 groups (3-bit zeros 30 and 31, kernels/NOTES.md run 34), K off 128, one group a row
    for (n, k, g), bits, m in itertools.product([(96, 4096, 128), (40, 4160, 64), (24, 1000, 1000), (40, 4352, 256)],
                                                [2, 3, 4, 8], [1, 4, 16, 40]):
        w = pack(*random_qsz(n, k, g, bits, seed=n + bits + m, device="cuda"), bits, g)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        packed_matmul(x, w)
        if 1 < m <= 16:
            for split, ahead, shared in ((3, 1, False), (1, 2, False), (3, 4, True), (5, 2, True)):
                cfg = KernelConfig("mma", block_n=64, block_k=128, block_m=16, split_k=split, num_stages=ahead,
                                   x_shared=shared)
                packed_matmul(x, w, config=cfg)
        if m <= 16:  # the CUDA C kernel (``_mma_gemv``): warps splitting K, one or two steps ahead
            for warps, depth in ((1, 2), (3, 1), (16, 2)):
                cfg = KernelConfig("cuda", block_n=16, block_k=128, block_m=16, num_warps=warps, num_stages=depth)
                packed_matmul(x, w, config=cfg)
        if m <= 8:  # weights as the MMA's A operand (``_skinny``): row tiles, warps, depths, splits
            for rt, nw, split, depth in ((2, 1, 3, 1), (1, 2, 1, 2), (1, 1, 5, 4)):
                cfg = KernelConfig("skinny", block_n=16 * rt * nw, block_k=128, block_m=8, split_k=split,
                                   num_warps=nw, num_stages=depth)
                packed_matmul(x, w, config=cfg)
    torch.cuda.synchronize()

    from gated_cases import tiny_model
    from hpsearch.kernels import fuse_gated_mlps, fuse_packed_siblings, fuse_rope_attention
    from transformers import StaticCache

    for arch in ("llama", "qwen2"):  # qwen2: q/k/v biases
        model = tiny_model(arch, "cuda", layers=2)
        example = torch.zeros(1, 2, dtype=torch.long, device="cuda")
        fuse_packed_siblings(model, input_ids=example)
        fuse_gated_mlps(model, input_ids=example)
        fuse_rope_attention(model, example)
        for batch in (1, 4):
            cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=8)
            ids = torch.randint(0, model.config.vocab_size, (batch, 6), device="cuda")
            with torch.no_grad():
                model(input_ids=ids[:, :4], past_key_values=cache, cache_position=torch.arange(4, device="cuda"))
                for t in (4, 5):
                    model(input_ids=ids[:, t:t + 1], past_key_values=cache,
                          cache_position=torch.arange(t, t + 1, device="cuda"))
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
