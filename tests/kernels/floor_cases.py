"""The memory-floor read kernel (``hpsearch.bench.memory_floor``) under ``TRITON_INTERPRET=1`` (run
as a script, in a fresh process, by ``test_memory_floor``): for each tile the bench times, whether
each program's output is the XOR of its words, on a size whose last program is short. Prints
``{tile: true | message}``."""

from __future__ import annotations

import functools
import json

import torch


def main() -> None:
    from hpsearch.bench import memory_floor

    out = {}
    for block, loads, nw in memory_floor.TILES:
        g = torch.Generator().manual_seed(block + loads)
        n = 2 * block * loads + 37  # a last program with 37 words: the rest masked
        src = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32)
        progs = memory_floor.programs(n, block, loads)
        got = torch.zeros(progs, dtype=torch.int32)
        memory_floor.read(src, got, block, loads, nw)
        per = block * loads
        want = [functools.reduce(lambda a, b: a ^ b, src[p * per:(p + 1) * per].tolist(), 0) for p in range(progs)]
        out[f"b{block}l{loads}w{nw}"] = got.tolist() == want or f"got {got.tolist()}, want {want}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
