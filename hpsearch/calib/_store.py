"""Content-addressed caches, in memory for the process and on disk (safetensors) for every process.

Layout under the cache directory::

    calib/<key>.safetensors        statistics of one (model, calibration set)
    logits/<key>.safetensors       the uncompressed model's logits on one evaluation set
    quantized/<kk>/<key>.safetensors  one quantized weight (codes, scales, zeros, in_scale)

A key is a hash of everything the entry depends on; the full description is stored in the file's
metadata and checked on load, so an entry is only ever used for what it was computed from. Files
are written to a temporary name and renamed, so concurrent workers never read half a file.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpsearch.calib._capture import LayerStats
from hpsearch.methods.grid import QuantizedWeight

__all__ = ["CachedCalibration", "TensorStore", "QuantCache"]


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"hpsearch": json.dumps(meta, sort_keys=True, default=str)})
    os.replace(tmp, path)


def _read(path: Path, expect: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` if it exists and was written for ``expect``; else ``None``."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("hpsearch", "null"))
            if meta is None or meta.get("describes") != json.loads(json.dumps(expect, sort_keys=True, default=str)):
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            tensors["__meta__"] = meta  # type: ignore[assignment]
            return tensors
    except Exception:  # truncated or foreign file: recompute
        return None


class CachedCalibration:
    """Statistics of a (model, calibration set), loaded lazily from the cache file.

    Args:
        key: the content key.
        stats: statistics per owner layer, or ``None`` to read them from ``path`` on first use.
        aliases: ``layer -> owner`` for layers sharing an owner's input.
        path: the safetensors file.
    """

    sequential = False

    def __init__(self, key: str, stats: dict[str, LayerStats] | None, aliases: dict[str, str] | None,
                 path: Path | None, describes: dict[str, Any]) -> None:
        self.key, self.path, self.describes = key, path, describes
        self._stats, self._aliases = stats, aliases
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._stats is not None:
                return
            tensors = _read(self.path, self.describes)
            if tensors is None:
                raise FileNotFoundError(f"calibration cache entry {self.path} vanished or changed")
            meta = tensors.pop("__meta__")
            self._aliases = dict(meta["aliases"])
            n_tokens = dict(meta["n_tokens"])
            self._stats = {
                name: LayerStats(tensors[f"{name}::hessian"], tensors[f"{name}::mean_abs"],
                                 tensors[f"{name}::max_abs"], n_tokens[name])
                for name in n_tokens
            }

    @property
    def aliases(self) -> dict[str, str]:
        self._load()
        return dict(self._aliases)

    def owner(self, name: str) -> str:
        """The layer whose input statistics ``name`` shares (itself if none)."""
        self._load()
        return self._aliases.get(name, name)

    def layer(self, name: str) -> LayerStats:
        """Input statistics of the linear layer ``name``."""
        self._load()
        try:
            return self._stats[self.owner(name)]
        except KeyError:
            raise KeyError(f"no calibration statistics for {name!r}: the layer never ran on the calibration data") from None

    def for_model(self, model: torch.nn.Module) -> CachedCalibration:
        """Statistics to use while compressing ``model``: the cached ones, whatever the model."""
        return self

    def save(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, st in self._stats.items():
            tensors[f"{name}::hessian"] = st.hessian
            tensors[f"{name}::mean_abs"] = st.mean_abs
            tensors[f"{name}::max_abs"] = st.max_abs
        meta = {"describes": self.describes, "aliases": self._aliases,
                "n_tokens": {n: st.n_tokens for n, st in self._stats.items()}}
        _write(self.path, tensors, meta)


class TensorStore:
    """Memory (bounded, most recent first) + disk cache of calibration entries by key."""

    def __init__(self, root: Path, max_in_memory: int = 2) -> None:
        self.root = Path(root)
        self.max_in_memory = max_in_memory
        self._memory: OrderedDict[str, CachedCalibration] = OrderedDict()
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def calibration(self, key: str, describes: dict[str, Any],
                    compute: Callable[[], tuple[dict[str, LayerStats], dict[str, str]]]) -> CachedCalibration:
        """The entry for ``key``: from memory, else from disk, else ``compute()``d and stored."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self.root / "calib" / f"{key}.safetensors"
        entry = CachedCalibration(key, None, None, path, describes)
        if not _has_entry(path, describes):
            stats, aliases = compute()
            stats = {n: LayerStats(s.hessian.cpu(), s.mean_abs.cpu(), s.max_abs.cpu(), s.n_tokens) for n, s in stats.items()}
            entry = CachedCalibration(key, stats, aliases, path, describes)
            entry.save()
        with self._lock:
            self._memory[key] = entry
            while len(self._memory) > self.max_in_memory:
                self._memory.popitem(last=False)
        return entry

    def tensor(self, kind: str, key: str, describes: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A single cached tensor (e.g. baseline logits) under ``kind/``."""
        with self._lock:
            if (kind, key) in self._tensors:
                return self._tensors[(kind, key)]
        path = self.root / kind / f"{key}.safetensors"
        found = _read(path, describes)
        if found is not None:
            value = found["value"]
        else:
            value = compute()
            _write(path, {"value": value}, {"describes": describes})
        with self._lock:
            self._tensors[(kind, key)] = value
            while len(self._tensors) > self.max_in_memory:
                self._tensors.pop(next(iter(self._tensors)))
        return value


def _has_entry(path: Path, describes: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("hpsearch", "null"))
    except Exception:
        return False
    return meta is not None and meta.get("describes") == json.loads(json.dumps(describes, sort_keys=True, default=str))


class QuantCache:
    """Quantized weights by key: memory (bounded by bytes) + disk.

    Args:
        root: the cache directory.
        max_bytes: memory budget of the in-process copy (least recently used entries leave first);
            ``None``: ``$HPSEARCH_QCACHE_GB`` GiB, 8 by default.
        disk: also read and write ``quantized/`` files.
    """

    def __init__(self, root: Path, max_bytes: int | None = None, disk: bool = True) -> None:
        if max_bytes is None:  # $HPSEARCH_QCACHE_GB, default 8 GB of host memory
            max_bytes = int(float(os.environ.get("HPSEARCH_QCACHE_GB", "8")) * 2**30)
        self.root, self.max_bytes, self.disk = Path(root), max_bytes, disk
        self._memory: OrderedDict[str, QuantizedWeight] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / "quantized" / key[:2] / f"{key}.safetensors"

    @staticmethod
    def _size(qw: QuantizedWeight) -> int:
        return sum(t.numel() * t.element_size() for t in (qw.q, qw.scale, qw.zero, qw.in_scale) if t is not None)

    def _remember(self, key: str, qw: QuantizedWeight) -> None:
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = qw
            self._bytes += self._size(qw)
            while self._bytes > self.max_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._bytes -= self._size(old)

    def get(self, key: str, describes: dict[str, Any]) -> QuantizedWeight | None:
        with self._lock:
            qw = self._memory.get(key)
            if qw is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return qw
        found = _read(self._path(key), describes) if self.disk else None
        if found is None:
            self.misses += 1
            return None
        meta = found.pop("__meta__")
        qw = QuantizedWeight(found["q"], found["scale"], found["zero"], int(meta["bits"]), int(meta["group_size"]),
                             bool(meta["sym"]), found.get("in_scale"))
        self._remember(key, qw)
        self.hits += 1
        return qw

    def put(self, key: str, describes: dict[str, Any], qw: QuantizedWeight) -> None:
        cpu = QuantizedWeight(qw.q.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.bits, qw.group_size, qw.sym,
                              None if qw.in_scale is None else qw.in_scale.cpu())
        self._remember(key, cpu)
        if self.disk:
            tensors = {"q": cpu.q, "scale": cpu.scale, "zero": cpu.zero}
            if cpu.in_scale is not None:
                tensors["in_scale"] = cpu.in_scale
            _write(self._path(key), tensors, {"describes": describes, "bits": qw.bits,
                                              "group_size": qw.group_size, "sym": qw.sym})
