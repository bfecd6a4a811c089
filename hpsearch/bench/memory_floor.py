"""The memory floor of a layer: the fastest plain read of its bytes, timed as a packed matmul is.

The speed-up a packed kernel can reach is bounded by bytes: ``limit`` in ``python -m hpsearch.bench
kernels`` is the ratio of bytes moved. What a GPU actually delivers for reading N bytes once, in
back-to-back launches, is lower and has a fixed cost per launch. :func:`floor_us` measures it with
the same harness as the kernels (CUDA-graph replays, copies past the L2): each program XORs a
contiguous run of words into one output word, so nothing but the reads costs time. Best of a few
tile shapes (2-8 KB a program, the fastest in kernels/NOTES.md run 38).

On an H100 80GB HBM3 this read took ``1.5 us + bytes / 3.16 TB/s`` (run 38); a float16 weight's
read is what float16 cuBLAS competes with, a packed layer's what our kernels do.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: (int32 words a load, loads a program, warps): the tiles timed, best taken (run 38's fastest)
TILES = ((512, 1, 4), (512, 2, 4), (1024, 2, 8), (2048, 1, 8))


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def read_kernel(src, out, n, BLOCK: tl.constexpr, LOADS: tl.constexpr):
    """Program ``p`` XORs words ``p * BLOCK * LOADS ..`` (``LOADS`` loads of ``BLOCK``, all in flight
    at once) of ``src[:n]`` into ``out[p]``."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * LOADS)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(LOADS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.reduce(acc, 0, _xor))


def read(src, out, block: int = 512, loads: int = 1, num_warps: int = 4) -> None:
    """Launch :func:`read_kernel` over the int32 tensor ``src``; ``out`` has a word a program."""
    n = src.numel()
    read_kernel[(triton.cdiv(n, block * loads),)](src, out, n, BLOCK=block, LOADS=loads, num_warps=num_warps)


def programs(n_words: int, block: int, loads: int) -> int:
    return triton.cdiv(n_words, block * loads)


def floor_us(nbytes: int, replays: int = 7) -> tuple[float, str]:
    """Median microseconds of the fastest tile reading ``nbytes`` once (CUDA), and that tile."""
    import torch

    from .kernels import _copies, time_us

    n = max(1, nbytes // 4)
    bufs = [torch.randint(-2**31, 2**31 - 1, (n,), device="cuda", dtype=torch.int32) for _ in range(_copies(n * 4))]
    out = torch.empty(programs(n, TILES[0][0], TILES[0][1]), device="cuda", dtype=torch.int32)
    best = None
    for block, loads, nw in TILES:
        us = time_us([lambda b=b, t=(block, loads, nw): read(b, out, *t) for b in bufs], replays)
        if best is None or us < best[0]:
            best = (us, f"read:b{block}l{loads}w{nw}")
    del bufs
    return best


def run(args: list[str]) -> dict:
    """``python -m hpsearch.bench memory_floor [--mb 2,4,...,256]``: the floor at each size and the
    line ``fixed_us + bytes / bandwidth`` fitted through them (least squares)."""
    import argparse

    import torch

    p = argparse.ArgumentParser(prog="python -m hpsearch.bench memory_floor")
    p.add_argument("--mb", default="2,4,8,16,32,64,128,256", help="comma-separated sizes, MiB")
    p.add_argument("--replays", type=int, default=7)
    a = p.parse_args(args)
    sizes = [int(v) for v in a.mb.split(",")]
    if not torch.cuda.is_available():
        return {"error": "needs a CUDA GPU", "device": "cpu"}
    rows = []
    for mb in sizes:
        us, tile = floor_us(mb << 20, a.replays)
        rows.append({"MiB": mb, "floor_us": round(us, 2), "tile": tile, "TB_s": round((mb << 20) / us / 1e6, 3)})
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": rows}
    if len(rows) >= 2:
        xs = [float(r["MiB"] << 20) for r in rows]
        ys = [r["floor_us"] for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out["fit"] = {"fixed_us": round(my - slope * mx, 2), "bandwidth_TB_s": round(1 / slope / 1e6, 3)}
    return out
