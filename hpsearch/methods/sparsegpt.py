"""SparseGPT: one-shot pruning with optimal-brain-surgeon updates, optionally quantizing the kept
weights in the same pass (Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774).

Algorithm 1 of the paper, symbol for symbol: columns are visited left to right; at the start of
every block of ``B_s`` columns the mask of that block is chosen by the OBS saliency
``w^2 / [H^-1]_cc^2`` (adaptive mask selection, Section 3.4; for ``N:M`` every ``M`` columns,
Section 3.5); each column is pruned (and, jointly, quantized: Section 3.5 "joint sparsification
and quantization") and the error ``(w - q) / [H^-1]_cc`` is spread over the columns not yet
visited through the row of the Cholesky factor of ``H^-1`` (Equation (5) and the lazy batch
update of GPTQ). ``H = X^T X`` is the layer's input Hessian (any positive scaling).

The quantized weights are on :mod:`hpsearch.methods.grid`'s format; a pruned weight gets its
group's zero point as code, which dequantizes to exactly 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from hpsearch.methods.grid import QuantizedWeight, fit_grid
from hpsearch.methods.sparsity import mask_codes, parse_pattern

__all__ = ["SparseGPTResult", "damped_inverse_cholesky", "sparsegpt"]


@dataclass
class SparseGPTResult:
    """What :func:`sparsegpt` returns.

    Attributes:
        weight: the pruned (and, when quantized, dequantized) weight, float32 ``[N, K]``.
        mask: bool ``[N, K]``, ``True`` where kept.
        quantized: codes, scales and zeros when ``bits < 16``, else ``None``.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    quantized: QuantizedWeight | None = None


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` with ``lambda = percdamp * mean(diag H)``
    (``H^-1 = U^T U``; row ``c`` of ``U`` is what Algorithm 1 calls ``H^-1_{c,:}`` up to a factor)."""
    H = H.clone()
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True)


def _per_block_counts(n_rows: int, i1: int, i2: int, sparsity: float) -> int:
    """Weights to prune in columns ``[i1, i2)`` so that the layer total is ``round(N*K*p)``."""
    return round(n_rows * i2 * sparsity) - round(n_rows * i1 * sparsity)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The column loop is thousands of tiny ops: on CPU, intra-op threads only add waiting (measured
    22.5 s with 2 threads vs 0.85 s with 1 for a 256x768 layer on a busy 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str | None = None, *,
              bits: int = 16, group_size: int = 128, sym: bool = False,
              grid: tuple[torch.Tensor, torch.Tensor] | None = None,
              blocksize: int = 128, percdamp: float = 0.01) -> SparseGPTResult:
    """Prune ``W`` (``[N, K]``) to ``sparsity`` (or ``N:M``), jointly quantizing when ``bits < 16``.

    Args:
        W: the layer's weight (not modified).
        H: its input Hessian ``X^T X``, ``[K, K]``.
        sparsity: share of weights removed (ignored for ``N:M`` patterns, which remove ``1 - N/M``).
        pattern: ``unstructured`` / ``None`` or ``"N:M"``.
        bits, group_size, sym: the quantization grid of the kept weights (``bits >= 16``: none).
        grid: an existing ``(scale, zero)`` of shape ``[N, K // group_size]`` to quantize onto
            (e.g. when the layer was quantized before it is pruned); fitted per group otherwise.
        blocksize: ``B_s``, columns per lazy update and per adaptive mask selection.
        percdamp: Hessian dampening, as a share of the mean diagonal.

    Returns:
        A :class:`SparseGPTResult`.
    """
    with _one_thread_on_cpu(W.device):
        return _sparsegpt(W, H, sparsity, pattern, bits=bits, group_size=group_size, sym=sym, grid=grid,
                          blocksize=blocksize, percdamp=percdamp)


@torch.no_grad()
def _sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str | None, *, bits: int,
               group_size: int, sym: bool, grid: tuple[torch.Tensor, torch.Tensor] | None, blocksize: int,
               percdamp: float) -> SparseGPTResult:
    nm = parse_pattern(pattern)
    quantize = bits < 16
    maxq = 2**bits - 1
    W = W.detach().float().clone()
    H = H.detach().to(W).clone()
    n_rows, n_cols = W.shape
    if quantize and n_cols % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={n_cols}")
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={nm[1]}")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = damped_inverse_cholesky(H, percdamp)

    M = torch.zeros_like(W, dtype=torch.bool)  # True where pruned
    n_groups = n_cols // group_size if quantize else 0
    scale = torch.zeros(n_rows, n_groups, device=W.device) if quantize else None
    zero = torch.zeros(n_rows, n_groups, device=W.device) if quantize else None
    if quantize and grid is not None:
        scale.copy_(grid[0].float())
        zero.copy_(grid[1].float())

    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1).reshape(1, -1)
        if nm is None:
            # Adaptive mask selection (Section 3.4): the lowest w^2 / [H^-1]_cc^2 of the block.
            M1 = torch.zeros_like(W1, dtype=torch.bool)
            k = _per_block_counts(n_rows, i1, i2, sparsity)
            if k > 0:
                saliency = (W1**2 / d1**2).flatten()
                M1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                # N:M (Section 3.5): prune the M - N lowest-saliency weights of the next M columns.
                n, m = nm
                saliency = W1[:, i : i + m] ** 2 / d1[:, i : i + m] ** 2
                M1.scatter_(1, i + torch.topk(saliency, m - n, dim=1, largest=False).indices, True)
            col = i1 + i
            if quantize and grid is None and col % group_size == 0:
                # Fit the grid of the group starting here on its current (partly updated) weights.
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                known = torch.cat([M1[:, i:], M[:, i2:]], dim=1)[:, :group_size]
                s, z = fit_grid(cur.masked_fill(known, 0.0), bits, group_size, sym)
                scale[:, col // group_size] = s[:, 0]
                zero[:, col // group_size] = z[:, 0]
            q = w.clone()
            q[M1[:, i]] = 0
            if quantize:
                s, z = scale[:, col // group_size], zero[:, col // group_size]
                code = torch.clamp(torch.round(q / s) + z, 0, maxq)
                q = torch.where(M1[:, i], torch.zeros_like(q), (code - z) * s)
            Q1[:, i] = q
            err1 = (w - q) / d  # Algorithm 1: E_{:, j-i} = (W_:,j - M_:,j * W_:,j) / [H^-1]_jj
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        M[:, i1:i2] = M1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # lazy batch update

    M |= dead.unsqueeze(0).expand_as(M)
    W[M] = 0
    mask = ~M
    qw = None
    if quantize:
        codes = torch.clamp(torch.round(W.reshape(n_rows, n_groups, group_size) / scale.unsqueeze(-1))
                            + zero.unsqueeze(-1), 0, maxq).reshape(n_rows, n_cols).to(torch.uint8)
        zero_u8 = zero.to(torch.uint8)
        codes = mask_codes(codes, zero_u8, group_size, mask)
        qw = QuantizedWeight(codes, scale.half(), zero_u8, bits, group_size, sym)
        W = qw.dequantize(torch.float32)
    return SparseGPTResult(W, mask, qw)
