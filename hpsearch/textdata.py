"""Text sources for evaluation and calibration, and fixed token blocks cut from them.

A source is one string, so calibration and evaluation sets are plain overrides:

* ``embedded:<split>`` — the embedded corpus (``train``, ``valid``, ``test``);
* a path to a ``.txt`` file, or a ``.jsonl`` file with a ``text`` field per line;
* ``hf:<dataset>[:<config>]:<split>`` — a hub data set (needs the hub; e.g.
  ``hf:wikitext:wikitext-2-raw-v1:test``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from hpsearch.errors import ConfigError

__all__ = ["load_text", "token_blocks"]


@functools.lru_cache(maxsize=8)
def load_text(source: str, key: str = "source") -> str:
    """The text a source names; a one-line :class:`ConfigError` naming ``key`` when it can't be read."""
    if source.startswith("embedded:"):
        from hpsearch import zoo

        try:
            return zoo.load_split(source.split(":", 1)[1])
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(key, f"{source!r}: use hf:<dataset>[:<config>]:<split>")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        try:
            import datasets

            rows = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # offline, unknown data set...
            raise ConfigError(key, f"cannot load {source!r}: {str(exc).splitlines()[0][:160]}") from None
        return "\n\n".join(r for r in rows["text"] if r.strip())
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{source!r} is not a file; use embedded:<train|valid|test>, a .txt/.jsonl path or hf:<dataset>[:<config>]:<split>")
    if path.suffix == ".jsonl":
        return "\n\n".join(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
    return path.read_text()


def token_blocks(tokenizer, source: str, seq_len: int, max_tokens: int | None = None,
                 n_blocks: int | None = None, seed: int | None = None, key: str = "source") -> torch.Tensor:
    """Blocks of ``seq_len`` tokens from a source: ``[n, seq_len]`` int64.

    Without ``seed`` the blocks are consecutive from the start (evaluation: the same tokens for
    every trial); with ``seed`` they start at random offsets (calibration samples).
    """
    ids = _encode(tokenizer, source, key)
    if ids.numel() < seq_len + 1:
        raise ConfigError(key, f"{source!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if seed is None:
        n = ids.numel() // seq_len
        if max_tokens:
            n = min(n, max(1, max_tokens // seq_len))
        if n_blocks:
            n = min(n, n_blocks)
        return ids[: n * seq_len].reshape(n, seq_len).clone()
    gen = torch.Generator().manual_seed(seed)
    n = n_blocks or max(1, (max_tokens or seq_len) // seq_len)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@functools.lru_cache(maxsize=8)
def _encode_cached(tokenizer_id: int, tokenizer, source: str, key: str) -> torch.Tensor:
    text = load_text(source, key)
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def _encode(tokenizer, source: str, key: str) -> torch.Tensor:
    return _encode_cached(id(tokenizer), tokenizer, source, key)
