"""2:4 semi-structured sparse vs dense float16 linear layers of 7B shape, timed on a CUDA GPU.

``python -m hpsearch.bench sparse24_latency [--batches 1,16] [--repeats 7] [--iters 100]``

For each Llama-2-7B linear shape (q/k/v/o ``4096x4096``, gate/up ``11008x4096``, down
``4096x11008``) and each batch of tokens, times ``F.linear(x, W)`` with a dense float16 ``W``
against the same weight pruned 2:4 and converted with ``torch.sparse.to_sparse_semi_structured``
(cuSPARSELt when PyTorch has it, else CUTLASS; both are timed when both work), in two forms:
``F.linear(x, W_s)`` and ``(W_s @ x^T)^T`` (the sparse operand first, as torchao does for small
batches). Each figure is the median over ``repeats`` of the mean of ``iters`` back-to-back calls
timed with CUDA events. Needs only torch (runs where hydra/optuna are absent).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F

SHAPES_7B = {"attn_qkvo": (4096, 4096), "mlp_gate_up": (11008, 4096), "mlp_down": (4096, 11008)}
#: Linears per decoder block of each shape (q, k, v, o; gate, up; down).
PER_BLOCK = {"attn_qkvo": 4, "mlp_gate_up": 2, "mlp_down": 1}


def _time_us(fn, repeats: int, iters: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples)


def _mask_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.abs().reshape(w.shape[0], -1, 4)
    keep = torch.topk(groups, 2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(w.shape)


def run(args: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m hpsearch.bench sparse24_latency")
    p.add_argument("--batches", default="1,16", help="comma-separated token batch sizes")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=100)
    a = p.parse_args(args)
    if not torch.cuda.is_available():
        return {"error": "needs a CUDA GPU", "device": "cpu"}
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    dev = torch.device("cuda")
    torch.manual_seed(0)
    batches = [int(b) for b in a.batches.split(",")]
    backends = []
    for force_cutlass in (False, True):
        SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
        try:
            w = torch.randn(128, 128, device=dev, dtype=torch.float16)
            to_sparse_semi_structured(w * _mask_24(w))
            backends.append("cutlass" if force_cutlass else "default")
        except (RuntimeError, NotImplementedError) as exc:  # a backend absent from this build or GPU
            print(f"backend {'cutlass' if force_cutlass else 'default'}: {exc}", file=sys.stderr)
    results: dict[str, Any] = {}
    for shape_name, (n, k) in SHAPES_7B.items():
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        w24 = w * _mask_24(w)
        for b in batches:
            x = torch.randn(b, k, device=dev, dtype=torch.float16)
            row: dict[str, Any] = {"dense_us": _time_us(lambda x=x, w=w: F.linear(x, w), a.repeats, a.iters)}
            for backend in backends:
                SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                ws = to_sparse_semi_structured(w24)
                row[f"{backend}_backend"] = type(ws).__name__
                ref = F.linear(x, w24).float()
                forms = (("linear", lambda x=x, ws=ws: F.linear(x, ws)),
                         ("sparse_first", lambda x=x, ws=ws: torch.mm(ws, x.t()).t()))
                for form, fn in forms:
                    try:
                        err = (fn().float() - ref).abs().max().item()
                        row[f"{backend}_{form}_us"] = _time_us(fn, a.repeats, a.iters)
                        row[f"{backend}_{form}_maxerr"] = err
                    except (RuntimeError, NotImplementedError) as exc:  # e.g. CUTLASS on sm90
                        row[f"{backend}_{form}_error"] = str(exc).splitlines()[0][:200]
            results[f"{shape_name}_{n}x{k}_b{b}"] = row
            print(shape_name, b, row, file=sys.stderr)
    # One 7B decoder block's linears, dense vs the best sparse form per shape.
    block: dict[str, Any] = {}
    for b in batches:
        dense = sum(results[f"{s}_{n}x{k}_b{b}"]["dense_us"] * PER_BLOCK[s] for s, (n, k) in SHAPES_7B.items())
        best = 0.0
        for s, (n, k) in SHAPES_7B.items():
            row = results[f"{s}_{n}x{k}_b{b}"]
            sparse = [v for key, v in row.items() if key.endswith("_us") and key != "dense_us"]
            best += (min(sparse) if sparse else float("nan")) * PER_BLOCK[s]
        block[f"b{b}"] = {"dense_us": dense, "best_sparse24_us": best, "speedup": dense / best if best else None}
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": "float16",
        "backends": backends,
        "repeats": a.repeats,
        "iters": a.iters,
        "layers": results,
        "decoder_block_7b": block,
    }
