"""``python -m hpsearch.bench kernels``: its rows, the hot timings of ``--hot``, the one-row sweep grid."""

from __future__ import annotations

import pytest
import torch

from hpsearch.bench import kernels as bench


def test_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the bench runs")
    assert bench.run(["--hot"]) == {"error": "needs a CUDA GPU", "device": "cpu"}


def test_one_row_sweep_takes_small_programs():
    """Run 39 (kernels/NOTES.md): one- and two-warp programs of short unpipelined tiles won at one
    row on Llama shapes, so the sweep that writes the table must time them."""
    configs = bench.sweep_configs(1, 11008, 4096, 4)
    for warps, tiles in ((2, {(8, 1024), (16, 1024), (8, 2048)}), (1, {(8, 1024), (8, 2048)})):
        small = [c for c in configs if c.kind == "gemv_h2" and c.num_warps == warps and c.num_stages == 1]
        assert {(c.block_n, c.block_k) for c in small} >= tiles


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hot_rows_only_where_the_weights_fit_in_l2():
    """8192x8192: float16 (128 MiB) is past any GPU's L2 today; 1024x2048 fits in all of them."""
    out = bench.run(["--shapes", "1024x2048,8192x8192", "--m", "1", "--bits", "4", "--hot", "--no-floor", "--jobs",
                     "1", "--replays", "3"])
    rows = [r for r in out["rows"] if r["kernel"] == "hpsearch"]
    assert len(rows) == 2
    for row in rows:
        assert "floor_us" not in row
        fp16_fits = bench._fits_l2(row["K"] * row["N"] * 2)
        assert ("fp16_hot_us" in row) == fp16_fits
        assert all(row[key] > 0 for key in ("fp16_hot_us", "packed_hot_us") if key in row)
    assert "fp16_hot_us" in rows[0] and "packed_hot_us" in rows[0]
    assert "fp16_hot_us" not in rows[1]
