"""The ``calib`` config group: which calibration tokens, how many, where the cache lives."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hpsearch.errors import ConfigError

__all__ = ["CalibConfig", "cache_root"]


def cache_root(configured: str | None = None) -> Path:
    """The cache directory: ``calib.cache_dir`` if set, else ``$HPSEARCH_CACHE``, else
    ``~/.cache/hpsearch``."""
    raw = configured or os.environ.get("HPSEARCH_CACHE") or "~/.cache/hpsearch"
    return Path(raw).expanduser()


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and statistics options.

    Args:
        source: text source (see :mod:`hpsearch.textdata`): ``embedded:train``, a ``.txt`` or
            ``.jsonl`` path, or ``hf:<dataset>[:<config>]:<split>``.
        n_samples: calibration sequences.
        seq_len: tokens per sequence.
        seed: picks the random offsets of the sequences in the source.
        batch_size: sequences per forward pass while capturing.
        sequential: capture each block's input statistics on the trial's model after the blocks
            before it were compressed (layer after layer, quantized inputs), instead of once on
            the uncompressed model; costs a pass per trial and is never cached.
        cache_dir: where statistics and quantized weights are cached (``None``:
            ``$HPSEARCH_CACHE`` or ``~/.cache/hpsearch``).
        progress: show a progress bar while capturing.
    """

    source: str = "embedded:train"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    sequential: bool = False
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"calib.{name}", f"{value!r} is not allowed; allowed: a positive integer")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError("calib.source", "give embedded:<split>, a .txt/.jsonl path or hf:<dataset>[:<config>]:<split>")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> CalibConfig:
        """Build from the ``calib`` config node (``None``: defaults); unknown keys are errors."""
        if raw is None:
            return cls()
        if isinstance(raw, CalibConfig):
            return raw
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(raw, DictConfig):
                raw = OmegaConf.to_container(raw, resolve=True)
        except ImportError:  # pragma: no cover - the device machine has no omegaconf
            pass
        allowed = [f.name for f in fields(cls)]
        for key in raw:
            if key not in allowed:
                raise ConfigError(f"calib.{key}", f"unknown key; allowed: {', '.join(allowed)}")
        return cls(**dict(raw))

    @property
    def cache_path(self) -> Path:
        return cache_root(self.cache_dir)

    def identity(self) -> dict[str, Any]:
        """What the statistics depend on (not where they are cached or how they are batched)."""
        d = asdict(self)
        for key in ("cache_dir", "progress", "batch_size"):
            d.pop(key)
        return d
