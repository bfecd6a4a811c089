"""The memory-floor read (``hpsearch.bench.memory_floor``): the kernel reads every word once.

On CPU it runs under ``TRITON_INTERPRET=1`` in a child process (``floor_cases.py``) and must give,
per program, the XOR of its words, for every tile the bench times and a size that does not fill
the last program, without touching memory outside its tensors; the timing itself needs a GPU (the
bench refuses without one).
"""

from __future__ import annotations

import pytest
import torch
from packed_cases import assert_in_bounds, interpreted

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def results():
    return interpreted("floor_cases.py", timeout=300)


def test_each_program_xors_its_words(results):
    from hpsearch.bench import memory_floor

    assert set(results) - {"bounds"} == {f"b{b}l{l}w{w}" for b, l, w in memory_floor.TILES}
    for tile, ok in results.items():
        if tile != "bounds":
            assert ok is True, (tile, ok)


def test_reads_stay_inside_the_buffer(results):
    assert_in_bounds(results)


def test_bench_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the bench runs")
    from hpsearch.bench import memory_floor

    assert memory_floor.run(["--mb", "2"]) == {"error": "needs a CUDA GPU", "device": "cpu"}
