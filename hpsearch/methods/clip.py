"""MSE-optimal clipping of group-wise grids: shrink each group's range to minimise the layer error.

A min-max grid spends codes on the few largest weights of a group; shrinking the range by a factor
``p < 1`` clips them but rounds the rest more finely. The GPTQ reference code's ``mse`` option
(Frantar et al. 2022, ``quant.py``: ``xmin, xmax <- p * xmin, p * xmax`` for ``p`` on a grid down
to ``1 - maxshrink``) and AWQ's weight-clipping search (Lin et al. 2023, Section 3.3 "auto_clip",
20 steps down to half the range) both pick ``p`` per group by an error. Here the error is the
layer output error ``tr(dW H dW^T)`` with the cached input Hessian ``H = E[x x^T]`` (Equation (1)
of GPTQ), which couples the groups of a row through ``H``'s off-diagonal blocks, so ``p`` is chosen
by coordinate descent over the groups: each step keeps the best ``p`` for one group given the
others, starting from min-max (``p = 1``, always a candidate), so the error never increases.
"""

from __future__ import annotations

import torch

from hpsearch.methods.grid import fit_grid

__all__ = ["shrink_grid", "mse_clip_grid"]


def shrink_grid(steps: int, max_shrink: float) -> tuple[float, ...]:
    """``p`` values ``1, 1 - max_shrink / steps, ..., 1 - max_shrink`` (``steps + 1`` values)."""
    if steps < 1 or not 0.0 < max_shrink < 1.0:
        raise ValueError(f"steps={steps}, max_shrink={max_shrink}: need steps >= 1 and 0 < max_shrink < 1")
    return tuple(1.0 - max_shrink * i / steps for i in range(steps + 1))


def _fake_quant(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``(clamp(round(w / s) + z) - z) * s`` for ``wg`` ``[N, G, g]`` and a grid ``[N, G]``."""
    q = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


@torch.no_grad()
def mse_clip_grid(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, *,
                  shrinks: tuple[float, ...] = shrink_grid(20, 0.5), passes: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group shrink of the min-max grid minimising ``tr(dW H dW^T)`` (round-to-nearest codes).

    Args:
        W: weight ``[N, K]``.
        H: input Hessian ``[K, K]`` (``E[x x^T]``).
        bits, group_size, sym: the grid.
        shrinks: range factors ``p`` tried per group (``1`` is always added).
        passes: sweeps of coordinate descent over the groups.

    Returns:
        ``(scale, zero)``, each ``[N, K // group_size]``, as :func:`~hpsearch.methods.grid.fit_grid`
        gives them; the output error of RTN on this grid is at most that of the min-max grid.
    """
    W = W.float()
    H = H.to(W.device, torch.float32)
    N, K = W.shape
    G = K // group_size
    wg = W.reshape(N, G, group_size)
    scale, zero = fit_grid(W, bits, group_size, sym)
    dW = (wg - _fake_quant(wg, scale, zero, bits)).reshape(N, K)
    R = dW @ H  # error = sum(dW * R); a change D of group c adds 2 <D, R_c> + <D H_cc, D>
    candidates = sorted({1.0, *map(float, shrinks)}, reverse=True)
    for _ in range(passes):
        for j in range(G):
            c = slice(j * group_size, (j + 1) * group_size)
            H_cc = H[c, c]
            best_gain = torch.zeros(N, device=W.device)
            best_delta = torch.zeros(N, group_size, device=W.device)
            best_s, best_z = scale[:, j].clone(), zero[:, j].clone()
            for p in candidates:
                s, z = fit_grid(W[:, c] * p, bits, group_size, sym)  # min-max of p * w: range shrunk by p
                delta = (W[:, c] - _fake_quant(wg[:, j : j + 1], s, z, bits)[:, 0]) - dW[:, c]
                gain = 2 * (delta * R[:, c]).sum(-1) + ((delta @ H_cc) * delta).sum(-1)
                better = gain < best_gain
                best_gain = torch.where(better, gain, best_gain)
                best_delta[better] = delta[better]
                best_s[better], best_z[better] = s[better, 0], z[better, 0]
            scale[:, j], zero[:, j] = best_s, best_z
            dW[:, c] += best_delta
            R += best_delta @ H[c, :]
    return scale, zero
