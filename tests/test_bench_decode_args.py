"""The decode bench refuses a bad ``--kv-heads`` at once, naming the option and what it accepts."""

from __future__ import annotations

import pytest

from hpsearch.bench.decode import run


@pytest.mark.parametrize("value", ["5", "0", "-8"])
def test_kv_heads_that_do_not_divide_the_heads_are_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        run(["--kv-heads", value])
    assert e.value.code == 2
    assert "--kv-heads must divide the 32 query heads (1, 2, 4, 8, 16 or 32)" in capsys.readouterr().err


def test_a_gated_mlp_without_fused_siblings_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        run(["--mlp", "gated", "--siblings", "separate"])
    assert e.value.code == 2
    assert "--mlp gated needs --siblings fused" in capsys.readouterr().err


def test_a_fused_rope_without_fused_siblings_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        run(["--rope", "fused", "--siblings", "separate"])
    assert e.value.code == 2
    assert "--rope fused needs --siblings fused" in capsys.readouterr().err


def test_a_mask_choice_with_the_split_kv_attention_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        run(["--mask", "additive", "--attention", "hpsearch"])
    assert e.value.code == 2
    assert "--mask additive|boolean needs SDPA" in capsys.readouterr().err
