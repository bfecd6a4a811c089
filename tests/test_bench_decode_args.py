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
