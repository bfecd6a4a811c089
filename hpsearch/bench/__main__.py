"""``python -m hpsearch.bench NAME [args]``: run one benchmark, print one JSON object.

Each benchmark is a module ``hpsearch.bench.<NAME>`` with ``run(args: list[str]) -> dict``; what it
returns is what it measured (with the device it ran on), printed as JSON on stdout. Progress and
logs go to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_") and m.name != "common")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m hpsearch.bench NAME [args]\nbenchmarks: {', '.join(names)}", file=sys.stderr)
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"hpsearch.bench: error: NAME: {name!r} is not a benchmark; allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    from hpsearch.kernels import _few_rows

    try:  # a bad kernel switch is refused before a benchmark builds anything
        _few_rows.enabled()
    except ValueError as e:
        print(f"hpsearch.bench: error: {e}", file=sys.stderr)
        return 2
    result = importlib.import_module(f"hpsearch.bench.{name}").run(argv[1:])
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
