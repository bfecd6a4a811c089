"""Packed low-bit matmuls against float16 cuBLAS, timed on a CUDA GPU.

``python -m hpsearch.bench kernels [--shapes 4096x4096,...] [--m 1,16] [--bits 2,3,4,8]
[--group-size 128] [--sweep] [--jobs 12]``

For each ``KxN`` weight shape (Llama-2-7B's q/k/v/o, gate/up, down and Llama-2-70B's gate/up) and
each number of rows ``M``, times ``F.linear(x, W)`` with a float16 ``W`` (cuBLAS), our packed
kernels (:func:`hpsearch.kernels.packed_matmul`) at each bit-width, and PyTorch's int4 tinygemm
kernel (``aten._weight_int4pack_mm``, bfloat16 only, the kernel torchao's int4 weight-only path
calls) against bfloat16 cuBLAS. Each time is the median, over replays of a CUDA graph, of the mean
per call of back-to-back calls that cycle through enough weight copies to defeat the 50 MB L2;
graphs remove launch gaps, as in a decode step under CUDA graphs.

A row is ``K, N, M, bits, kernel, fp16_us, packed_us, speedup, limit, config``: ``limit`` is the
speedup that bytes moved allow (float16 weight + activations over packed storage + activations),
``floor_us`` the measured memory floor of the packed layer (:mod:`.memory_floor`: the fastest plain
read of its bytes in the same harness; ``--no-floor`` skips it), ``floor_speedup`` = ``fp16_us /
floor_us`` the speed-up a kernel that only read its bytes would have, ``fp16_floor_us`` the floor of
the float16 weight (what cuBLAS competes with),
``config`` the tiles timed (``kind:n..k..``, ending in ``x`` where the activations go through shared
memory; an ``mma`` or ``skinny`` config the product cannot take runs the Triton kernels).
``--sweep`` also times every tile configuration of :func:`sweep_configs` and reports the best per
row; ``--tuning-out PATH`` writes them as the table :func:`hpsearch.kernels.choose_config`
reads (``HPSEARCH_KERNEL_TUNING=PATH``, or ``kernels/_tuned.py`` once copied there); ``--jobs``
compiles them in parallel processes first. Needs torch and triton only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672"
L2_DEFEAT_BYTES = 256 << 20


def sweep_configs(m: int, n: int, k: int, bits: int) -> list:
    """Tile configurations worth timing for ``m`` rows (the default one comes first)."""
    from hpsearch.kernels import KernelConfig, choose_config

    out = []
    if m == 1:
        for bn in (32, 64, 128):
            for sk in (1, 2, 4, 8):
                out.append(KernelConfig("gemv", block_n=bn, block_k=128, split_k=sk, num_stages=3))
        for bn, nw in ((32, 4), (64, 4), (128, 4), (128, 8), (256, 8)):
            for sk in (1, 2, 4, 8):
                out.append(KernelConfig("gemv_words", block_n=bn, block_k=128, split_k=sk, num_warps=nw,
                                        num_stages=3))
        out.append(KernelConfig("gemv_words", block_n=64, block_k=128, split_k=4, num_stages=4))
        out.append(KernelConfig("gemv_words", block_n=64, block_k=128, split_k=4, num_stages=2))
        for bn, nw in ((64, 4), (128, 4), (128, 8), (256, 8), (256, 4)):
            for sk in (1, 2, 4, 8):
                out.append(KernelConfig("gemv_asm", block_n=bn, block_k=128, split_k=sk, num_warps=nw, num_stages=3))
        for sk in (2, 4):
            out.append(KernelConfig("gemv_asm", block_n=128, block_k=128, split_k=sk, num_stages=2))
            out.append(KernelConfig("gemv_asm", block_n=128, block_k=128, split_k=sk, num_stages=4))
        # tiles of several groups: longer contiguous runs of each row per load
        for bk, bn, nw in ((256, 64, 4), (256, 128, 8), (512, 32, 4), (512, 64, 4), (512, 64, 8), (1024, 32, 4),
                           (1024, 16, 4)):
            for sk in (1, 2, 4, 8):
                out.append(KernelConfig("gemv_asm", block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=3))
        # few rows, long and unpipelined (every word of a program in flight at once; gemv_h2's best, run 14)
        for bn, bk in ((8, 1024), (16, 1024), (8, 2048), (16, 2048), (4, 4096), (8, 4096)):
            out.append(KernelConfig("gemv_asm", block_n=bn, block_k=bk, num_stages=1))
        # float16 pairs (2-4 bits; other inputs fall back to gemv_asm)
        for bn, bk, nw, sk, ns in ((16, 1024, 4, 1, 3), (32, 1024, 4, 1, 3), (32, 1024, 4, 1, 2), (16, 1024, 4, 1, 1),
                                   (32, 1024, 4, 1, 1), (64, 1024, 8, 1, 1), (16, 512, 4, 1, 3), (32, 512, 4, 1, 3),
                                   (16, 1024, 4, 2, 3), (16, 512, 4, 2, 1), (64, 256, 4, 2, 3), (32, 256, 4, 4, 3),
                                   (8, 1024, 4, 1, 3), (16, 2048, 4, 1, 2), (16, 2048, 8, 1, 2), (64, 512, 8, 2, 2),
                                   (16, 1024, 2, 1, 3), (8, 1024, 2, 1, 3), (32, 1024, 8, 1, 2), (16, 1024, 4, 1, 4),
                                   (32, 2048, 8, 1, 2), (16, 2048, 4, 1, 1), (32, 2048, 4, 1, 1), (8, 2048, 4, 1, 1),
                                   (32, 2048, 8, 1, 1), (16, 4096, 4, 1, 1), (8, 4096, 4, 1, 1), (16, 4096, 8, 1, 1),
                                   (8, 4096, 2, 1, 1), (4, 4096, 4, 1, 1), (4, 8192, 4, 1, 1), (8, 8192, 4, 1, 1),
                                   (8, 8192, 8, 1, 1), (4, 4096, 8, 1, 1), (2, 4096, 4, 1, 1), (8, 4096, 8, 1, 1),
                                   (16, 8192, 8, 1, 1), (4, 2048, 4, 1, 1), (2, 8192, 4, 1, 1), (4, 8192, 8, 1, 1),
                                   # two-warp programs of short unpipelined tiles (run 39: the one-row kernel is
                                   # bound by its own execution, not the memory system)
                                   (8, 1024, 2, 1, 1), (4, 1024, 2, 1, 1), (16, 1024, 2, 1, 1), (8, 512, 2, 1, 1),
                                   (4, 2048, 2, 1, 1), (8, 2048, 2, 1, 1), (16, 2048, 2, 1, 1), (4, 4096, 2, 1, 1),
                                   # and one-warp programs (run 39: 2 and 3 bits on 4096x11008)
                                   (8, 1024, 1, 1, 1), (8, 2048, 1, 1, 1), (4, 1024, 1, 1, 1), (16, 1024, 1, 1, 1),
                                   (8, 512, 1, 1, 1), (4, 2048, 1, 1, 1)):
            out.append(KernelConfig("gemv_h2", block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=ns))
    if m <= 8 and bits in (2, 3, 4) and _few_rows_enabled():  # weights as the MMA's A operand (``_skinny``)
        for rt, nw, sk, depth in ((2, 1, 4, 1), (2, 1, 4, 2), (1, 1, 4, 2), (1, 2, 4, 2), (2, 2, 4, 2), (2, 1, 2, 2),
                                  (1, 1, 8, 2), (2, 1, 8, 1), (1, 1, 2, 4), (4, 1, 4, 1)):
            if bits == 3 and rt * depth > 4:
                continue
            out.append(KernelConfig("skinny", block_n=16 * rt * nw, block_k=128, block_m=8, split_k=sk, num_warps=nw,
                                    num_stages=depth))
    if m <= 16 and bits in (2, 3, 4, 8):  # the CUDA C kernel (``_mma_gemv``, run 40): 16 rows a block, K split by warps
        from hpsearch.kernels import _mma_gemv

        for warps in (1, 2, 4, 8, 16):
            for depth in (1, 2):
                out.append(KernelConfig("cuda", block_n=16, block_k=_mma_gemv.step_codes(bits),
                                        block_m=8 if m <= 8 else 16, num_warps=warps, num_stages=depth))
    if m <= 16:
        # tensor cores over tiles of several groups
        for bn, bk, nw, sk in ((64, 512, 4, 1), (64, 512, 4, 2), (128, 512, 8, 1), (64, 256, 4, 2),
                               (32, 1024, 4, 1), (64, 1024, 8, 1), (128, 256, 4, 2)):
            out.append(KernelConfig("dot", block_n=bn, block_k=bk, block_m=16, split_k=sk, num_warps=nw,
                                    num_stages=3))
        for bn in (64, 128):
            for sk in (1, 2, 4, 8):
                out.append(KernelConfig("dot", block_n=bn, block_k=128, block_m=16, split_k=sk, num_stages=3))
        out.append(KernelConfig("dot", block_n=128, block_k=128, block_m=16, split_k=4, num_warps=8, num_stages=3))
        if bits in (2, 3, 4, 8) and _few_rows_enabled():  # operands from the loaded words (``_few_rows``, run 32)
            for bn, nw in ((64, 4), (128, 4), (128, 8), (256, 8), (256, 4)):
                for sk in (1, 2, 4, 8):
                    for ahead in (1, 2):
                        out.append(KernelConfig("mma", block_n=bn, block_k=128, block_m=16, split_k=sk, num_warps=nw,
                                                num_stages=ahead))
            if bits != 8:  # the activations copied to shared memory once a program (run 38)
                steps = -(-k // 128)
                for bn, sk, ahead in ((128, 4, 1), (128, 4, 2), (64, 4, 2), (64, 4, 4), (128, 8, 2), (64, 8, 4),
                                      (128, 16, 2), (64, 16, 4)):
                    if -(-steps // sk) <= 16:  # _few_rows.MAX_SHARED_STEPS
                        out.append(KernelConfig("mma", block_n=bn, block_k=128, block_m=16, split_k=sk,
                                                num_stages=ahead, x_shared=True))
    else:
        for bn, bm, nw in ((128, 64, 4), (128, 128, 8), (64, 128, 4)):
            out.append(KernelConfig("dot", block_n=bn, block_k=128 if bits < 8 else 64, block_m=bm,
                                    num_warps=nw, num_stages=3))
    default = choose_config(m, n, k, bits)
    return [default] + [c for c in out if c != default]


def _few_rows_enabled() -> bool:
    from hpsearch.kernels import _few_rows

    return _few_rows.enabled()


def _cfg_str(c) -> str:
    return (f"{c.kind}:n{c.block_n}k{c.block_k}m{c.block_m}s{c.split_k}w{c.num_warps}p{c.num_stages}"
            + ("x" if c.x_shared else ""))


def time_us(calls: list, replays: int = 7) -> float:
    """Median over graph replays of the mean time of one call (``calls`` cycle through copies)."""
    for f in calls:
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in calls:
        f()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = max(start.elapsed_time(end) / len(calls), 1e-3)
    inner = max(1, min(200, int(3.0 / (per_call_ms * len(calls)))))  # about 3 ms a replay
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(inner):
            for f in calls:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (inner * len(calls)))
    return statistics.median(samples)


def _fits_l2(nbytes: int) -> bool:
    """Whether weights of ``nbytes`` stay in this GPU's L2 between calls (with room for the rest:
    activations, outputs), so that timing one copy over and over times them hot."""
    return nbytes <= torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size * 3 // 4


def _copies(nbytes: int) -> int:
    return max(1, -(-L2_DEFEAT_BYTES // max(nbytes, 1)))


def _random_packed(n: int, k: int, bits: int, g: int, copies: int, gen: torch.Generator):
    from hpsearch.kernels import pack

    out = []
    for _ in range(copies):
        q = torch.randint(0, 2**bits, (n, k), device="cuda", dtype=torch.uint8, generator=gen)
        s = (torch.rand(n, k // g, device="cuda", generator=gen) / 64 + 1e-3).half()
        z = torch.randint(0, 2**bits, (n, k // g), device="cuda", dtype=torch.uint8, generator=gen)
        out.append(pack(q, s, z, bits, g))
    return out


def _tinygemm(n: int, k: int, g: int, copies: int, gen: torch.Generator):
    """Random int4 weights in the layout of ``aten._weight_int4pack_mm`` (None if unavailable)."""
    try:
        out = []
        for _ in range(copies):
            q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32, generator=gen)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
            sz = torch.rand(k // g, n, 2, device="cuda", generator=gen).to(torch.bfloat16) / 64
            out.append((packed, sz))
        return out
    except Exception as e:  # noqa: BLE001 - the library kernel is optional
        print(f"tinygemm unavailable: {e}", file=sys.stderr)
        return None


def _precompile(tasks: list[tuple], jobs: int) -> None:
    """Compile every (K, N, M, bits, g, config) in ``jobs`` processes, filling triton's disk cache."""
    import multiprocessing as mp

    chunks = [tasks[i::jobs] for i in range(jobs)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        pool.map(_compile_chunk, [c for c in chunks if c])


def _compile_chunk(tasks: list[tuple]) -> None:
    from hpsearch.kernels import packed_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n, m, bits, g, cfg in tasks:
        w = _random_packed(n, k, bits, g, 1, gen)[0]
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        try:
            packed_matmul(x, w, config=cfg)
        except Exception as e:  # noqa: BLE001 - reported when timed
            print(f"compile failed {k}x{n} m{m} b{bits} {_cfg_str(cfg)}: {e}", file=sys.stderr)
    torch.cuda.synchronize()


def run(args: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench kernels")
    p.add_argument("--shapes", default=SHAPES, help="comma-separated KxN weight shapes")
    p.add_argument("--m", default="1,16", help="comma-separated numbers of rows (tokens)")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="time every tile configuration")
    p.add_argument("--sweep-shapes", default=SHAPES, help="shapes the sweep covers")
    p.add_argument("--tuning-out", help="with --sweep: write the best configs (choose_config's table) here")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--replays", type=int, default=7)
    p.add_argument("--kinds", default=None,
                   help="with --sweep: only these kernel kinds besides the default config, e.g. cuda,gemv_h2")
    p.add_argument("--no-floor", action="store_true", help="skip the memory floor (a plain read of the bytes)")
    p.add_argument("--hot", action="store_true",
                   help="also time fp16 and the packed kernel with one weight copy, left in the L2 (fp16_hot_us, "
                        "packed_hot_us, for weights that fit in it): a kernel as slow hot as cold is bound by its "
                        "own execution, not the memory")
    a = p.parse_args(args)
    if not torch.cuda.is_available():
        return {"error": "needs a CUDA GPU", "device": "cpu"}
    from hpsearch.kernels import choose_config, packed_matmul

    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = [int(v) for v in a.m.split(",")]
    bits_list = [int(v) for v in a.bits.split(",")]
    sweep_shapes = {tuple(int(v) for v in s.split("x")) for s in a.sweep_shapes.split(",")} if a.sweep else set()
    g = a.group_size
    kinds = set(a.kinds.split(",")) if a.kinds else None
    # with --kinds the default config is still timed first: the baseline the kinds must beat
    plan = {(k, n, m, b): ([c for i, c in enumerate(sweep_configs(m, n, k, b)) if kinds is None or i == 0 or c.kind in kinds]
                           if (k, n) in sweep_shapes else [choose_config(m, n, k, b)])
            for (k, n) in shapes for m in ms for b in bits_list}
    if a.jobs > 1:
        _precompile([(k, n, m, b, g, c) for (k, n, m, b), cfgs in plan.items() for c in cfgs], a.jobs)

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict[str, Any]] = []
    tuning: dict[str, dict] = {}
    floors: dict[int, float] = {}

    def floor(nbytes: int) -> float:  # bytes -> measured floor, us (the same bytes recur across M)
        if nbytes not in floors:
            from .memory_floor import floor_us

            floors[nbytes] = floor_us(nbytes, a.replays)[0]
        return floors[nbytes]

    for k, n in shapes:
        fp16_w = [torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
                  for _ in range(_copies(n * k * 2))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            fp16_us = time_us([lambda x=x, w=w: F.linear(x, w) for w in fp16_w], a.replays)
            fp16_hot_us = None
            if a.hot and _fits_l2(n * k * 2):
                fp16_hot_us = time_us([lambda x=x, w=fp16_w[0]: F.linear(x, w)], a.replays)
            for bits in bits_list:
                ws = _random_packed(n, k, bits, g, _copies(n * k * bits // 8), gen)
                limit = (n * k * 2 + (m * k + m * n) * 2) / (ws[0].nbytes() + (m * k + m * n) * 2)
                best = None
                for cfg in plan[(k, n, m, bits)]:
                    try:
                        us = time_us([lambda x=x, w=w, c=cfg: packed_matmul(x, w, config=c) for w in ws], a.replays)
                    except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
                        print(f"{k}x{n} m{m} b{bits} {_cfg_str(cfg)} failed: {e}", file=sys.stderr)
                        continue
                    if a.sweep:
                        print(f"{k}x{n} m{m} b{bits} {_cfg_str(cfg)} {us:.1f}us", file=sys.stderr)
                    if best is None or us < best[0]:
                        best = (us, cfg)
                if best is None:
                    continue
                row = {"K": k, "N": n, "M": m, "bits": bits, "kernel": "hpsearch", "fp16_us": round(fp16_us, 2),
                       "packed_us": round(best[0], 2), "speedup": round(fp16_us / best[0], 2),
                       "limit": round(limit, 2), "config": _cfg_str(best[1])}
                if not a.no_floor:
                    fl = floor(ws[0].nbytes())
                    row.update(floor_us=round(fl, 2), floor_speedup=round(fp16_us / fl, 2),
                               fp16_floor_us=round(floor(n * k * 2), 2))
                if fp16_hot_us is not None:
                    row["fp16_hot_us"] = round(fp16_hot_us, 2)
                if a.hot and _fits_l2(ws[0].nbytes()):
                    hot = time_us([lambda x=x, w=ws[0], c=best[1]: packed_matmul(x, w, config=c)], a.replays)
                    row["packed_hot_us"] = round(hot, 2)
                if a.sweep:
                    bucket = 1 if m == 1 else (16 if m <= 16 else 0)
                    if bucket:  # choose_config's key for it
                        if best[1].kind == "cuda":
                            prefix = "cu"
                        elif 2 <= m <= 8 and best[1].kind in ("mma", "skinny"):
                            prefix, bucket = "gl", 4 if m <= 4 else 8
                        else:
                            prefix = "mma" if best[1].kind == "mma" else ""
                        tuning[f"{prefix}{bucket}:{k}x{n}:{bits}"] = dataclasses.asdict(best[1])
                rows.append(row)
                print(row, file=sys.stderr)
                del ws
            if 4 in bits_list and k % 1024 == 0 and g in (32, 64, 128, 256):
                tg = _tinygemm(n, k, g, _copies(n * k // 2), gen)
                if tg is not None:
                    xb = x.to(torch.bfloat16)
                    bf16_w = [t.to(torch.bfloat16) for t in fp16_w]
                    bf16_us = time_us([lambda xb=xb, w=w: F.linear(xb, w) for w in bf16_w], a.replays)
                    del bf16_w
                    us = time_us([lambda xb=xb, t=t: torch.ops.aten._weight_int4pack_mm(xb, t[0], g, t[1]) for t in tg],
                                 a.replays)
                    limit = (n * k * 2 + (m * k + m * n) * 2) / (n * k // 2 + n * (k // g) * 4 + (m * k + m * n) * 2)
                    rows.append({"K": k, "N": n, "M": m, "bits": 4, "kernel": "torch_int4pack_mm(bf16)",
                                 "fp16_us": round(bf16_us, 2), "packed_us": round(us, 2),
                                 "speedup": round(bf16_us / us, 2), "limit": round(limit, 2)})
                    print(rows[-1], file=sys.stderr)
        del fp16_w
    if a.tuning_out and tuning:
        with open(a.tuning_out, "w") as f:
            json.dump(tuning, f, indent=1, sort_keys=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "floor": None if a.no_floor else "fastest plain read of the bytes, same harness (memory_floor)",
            "triton": __import__("triton").__version__, "group_size": g, "rows": rows}
