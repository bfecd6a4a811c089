"""The decode bench refuses bad options at once, naming the option and what it accepts."""

from __future__ import annotations

import pytest
from conftest import refusal

from hpsearch.bench.decode import run


@pytest.mark.parametrize(("argv", "message"), [
    (["--kv-heads", "5"], "--kv-heads must divide the 32 query heads (1, 2, 4, 8, 16 or 32)"),
    (["--kv-heads", "0"], "--kv-heads must divide the 32 query heads (1, 2, 4, 8, 16 or 32)"),
    (["--kv-heads", "-8"], "--kv-heads must divide the 32 query heads (1, 2, 4, 8, 16 or 32)"),
    (["--mlp", "gated", "--siblings", "separate"], "--mlp gated needs --siblings fused"),
    (["--rope", "fused", "--siblings", "separate"], "--rope fused needs --siblings fused"),
    (["--mask", "additive", "--attention", "hpsearch"], "--mask additive|boolean needs SDPA"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),
])
def test_bad_options_are_refused_before_any_model_is_built(argv, message, capsys):
    assert message in refusal(run, argv, capsys)


def test_a_bad_kernel_switch_is_refused_before_any_benchmark_runs(monkeypatch, capsys):
    from hpsearch.bench.__main__ import main

    monkeypatch.setenv("HPSEARCH_FEW_ROWS", "yes")
    assert main(["decode"]) == 2
    assert "HPSEARCH_FEW_ROWS must be 0 (off) or 1 (on, the default), got 'yes'" in capsys.readouterr().err
