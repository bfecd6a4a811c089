"""The embedded corpus: CPython 3.11.7's standard library source, split by file.

The corpus is every UTF-8 ``*.py`` file under ``Lib/`` of CPython 3.11.7 (tests included,
``site-packages`` excluded), minus files that are mostly generated data rather than code:

- ``pydoc_data/topics.py`` (750 kB of reference-manual prose in one string);
- the ``encodings/`` character-map codecs produced by ``gencodec.py`` (tables of code points);
- files over 400 kB, and files where more than 2% of lines exceed 160 characters (data blobs);
- exact duplicates (by content; the lexicographically first path is kept).

Splits are by file, deterministic, from the SHA-256 of the path relative to ``Lib/``::

    bucket = int(sha256(path)[:8], 16) % 100
    test:  bucket <  5     held out: the perplexity objective; never trained on, never calibration
    valid: 5 <= bucket < 10  early stopping of the embedded model's training only
    train: bucket >= 10    the model's and the tokenizer's training data, and calibration

which gives train 1518 files (26.8 M characters, 7.9 M tokens of the embedded tokenizer),
valid 77 files (1.6 M characters) and test 76 files (0.95 M characters, 285 k tokens).

Python 3.10, 3.11 and 3.12 ship different standard libraries, so the prepared corpus is shipped
in the repository as ``data/pystdlib-3.11.7.json.xz``. Its uncompressed payload's SHA-256 is
:data:`CORPUS_SHA256` and is verified when the corpus is first loaded. ``load_split`` joins a
split's files, ordered by path, with a blank line between them.

Rebuild the shipped file (meaningful only on CPython 3.11.7; other versions are refused)::

    python -m hpsearch.zoo.corpus --build [--stdlib PATH]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import lzma
import pathlib
import sys
import sysconfig

__all__ = ["CORPUS_PATH", "CORPUS_SHA256", "SPLITS", "corpus_sha256", "load_files", "load_split"]

CORPUS_PATH = pathlib.Path(__file__).parent / "data" / "pystdlib-3.11.7.json.xz"
CORPUS_SHA256 = "c24b3d6a1637ce0ac633f419d17604048e23290cd7f5f2524ed2a65a5581a547"
SPLITS = ("train", "valid", "test")
SOURCE_VERSION = (3, 11, 7)
FORMAT = "hpsearch-corpus/1"

_MAX_BYTES = 400_000
_LONG_LINE = 160
_MAX_LONG_LINE_FRACTION = 0.02


def split_of(path: str) -> str:
    """Return the split (``train``/``valid``/``test``) of a path relative to ``Lib/``."""
    bucket = int(hashlib.sha256(path.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 5:
        return "test"
    if bucket < 10:
        return "valid"
    return "train"


def _keep(path: str, text: str) -> bool:
    if path.startswith("pydoc_data/"):
        return False
    if path.startswith("encodings/") and "generated from" in text[:1000].lower():
        return False
    if len(text.encode("utf-8")) > _MAX_BYTES:
        return False
    lines = text.splitlines() or [""]
    return sum(len(line) > _LONG_LINE for line in lines) <= _MAX_LONG_LINE_FRACTION * len(lines)


def build_payload(stdlib: pathlib.Path) -> bytes:
    """Collect, filter, deduplicate and split the ``*.py`` files under ``stdlib``.

    Returns:
        The UTF-8 JSON payload (deterministic: sorted paths, no timestamps).
    """
    files, seen = [], set()
    for p in sorted(stdlib.rglob("*.py"), key=lambda q: q.relative_to(stdlib).as_posix()):
        path = p.relative_to(stdlib).as_posix()
        if "site-packages" in p.relative_to(stdlib).parts:
            continue
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few tests are deliberately latin-1 / koi8-r
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen or not _keep(path, text):
            continue
        seen.add(digest)
        files.append({"path": path, "split": split_of(path), "text": text})
    payload = {"format": FORMAT, "source": "CPython 3.11.7 Lib/*.py", "files": files}
    return json.dumps(payload, ensure_ascii=False, sort_keys=True, indent=0).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _payload() -> dict:
    data = lzma.decompress(CORPUS_PATH.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise RuntimeError(
            f"corpus {CORPUS_PATH} has sha256 {digest}, expected {CORPUS_SHA256}; "
            "the shipped file is corrupt or was rebuilt without updating CORPUS_SHA256"
        )
    payload = json.loads(data)
    if payload.get("format") != FORMAT:
        raise RuntimeError(f"corpus format {payload.get('format')!r}, expected {FORMAT!r}")
    return payload


def corpus_sha256() -> str:
    """SHA-256 of the uncompressed corpus payload (verified on first load)."""
    _payload()
    return CORPUS_SHA256


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=len(SPLITS))
def _files(name: str) -> tuple[tuple[str, str], ...]:
    return tuple((f["path"], f["text"]) for f in _payload()["files"] if f["split"] == name)


def load_files(name: str) -> dict[str, str]:
    """Return the files of split ``name`` as ``{path relative to Lib/: source text}``."""
    _check_split(name)
    return dict(_files(name))


@functools.lru_cache(maxsize=len(SPLITS))
def _joined(name: str) -> str:
    return "\n\n".join(text for _, text in _files(name))


def load_split(name: str) -> str:
    """Return the raw text of split ``name`` (one of ``train``, ``valid``, ``test``).

    The corpus is decompressed and verified once and cached in memory.

    Raises:
        ValueError: ``name`` is not a split.
    """
    _check_split(name)
    return _joined(name)


def _default_stdlib() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpsearch.zoo.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="rebuild the shipped corpus file")
    parser.add_argument("--stdlib", type=pathlib.Path, default=None,
                        help="CPython 3.11.7 Lib/ directory (default: this interpreter's)")
    parser.add_argument("--out", type=pathlib.Path, default=CORPUS_PATH)
    args = parser.parse_args(argv)
    if not args.build:
        for name in SPLITS:
            files = _files(name)
            print(f"{name:5s} {len(files):5d} files {sum(len(t) for _, t in files):10d} chars")
        print(f"sha256 {corpus_sha256()}")
        return 0
    if args.stdlib is None and sys.version_info[:3] != SOURCE_VERSION:
        print(f"refusing to build: this is Python {sys.version.split()[0]}, the corpus is "
              f"CPython {'.'.join(map(str, SOURCE_VERSION))}'s; pass --stdlib to a 3.11.7 Lib/",
              file=sys.stderr)
        return 2
    data = build_payload(args.stdlib or _default_stdlib())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    digest = hashlib.sha256(data).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), payload sha256 {digest}")
    if digest != CORPUS_SHA256:
        print(f"payload differs from the recorded CORPUS_SHA256 {CORPUS_SHA256}: update it",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
