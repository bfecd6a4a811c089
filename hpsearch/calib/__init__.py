"""Calibration data and statistics, computed once per (model, calibration set) and cached.

:func:`calibration_for` is what the trial pipeline calls when a stage's
:meth:`~hpsearch.stages.base.Stage.requires` is non-empty. It returns per-linear-layer input
statistics (``hessian``, ``mean_abs``, ``max_abs``: see :mod:`hpsearch.calib._capture`) that are
captured with one pass over the calibration set on the *uncompressed* model, then kept in memory
for the process and on disk under the cache directory, keyed by the content of the model and the
calibration set (source, n_samples, seq_len, seed). A warm trial runs no forward pass over
calibration data. :func:`quant_cache_for` gives the per-layer quantized-weight cache that lets the
quantization stage skip GPTQ/AWQ for choices an earlier trial already made.

What cached statistics give up against sequential calibration: GPTQ's reference code quantizes
block after block and feeds block ``i`` the outputs of the already-*quantized* blocks before it, so
a layer's Hessian (and AWQ's ``mean|x|``) reflects the inputs it will really see and GPTQ
compensates part of the upstream error. Cached statistics come from the uncompressed model, so
they are independent of the plan (which is what makes them shareable across trials), but every
layer is quantized as if its inputs were exact; at 4 bits the difference is small, at 3 bits and
below sequential calibration is usually a little better. ``calib.sequential=true`` gives that
mode (:class:`SequentialCalibration`): statistics are captured per trial, block by block, on the
model being compressed, and neither they nor the quantized weights are cached.

Cache directory: ``calib.cache_dir``, else ``$HPSEARCH_CACHE``, else ``~/.cache/hpsearch``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpsearch.calib._capture import STAT_NAMES, LayerStats, StatsAccumulator, capture
from hpsearch.calib._config import CalibConfig, cache_root
from hpsearch.calib._hashing import digest, model_fingerprint, tensor_fingerprint
from hpsearch.calib._sequential import SequentialCalibration
from hpsearch.calib._store import CachedCalibration, QuantCache, TensorStore
from hpsearch.errors import ConfigError

__all__ = [
    "CalibConfig",
    "CachedCalibration",
    "LayerStats",
    "QuantCache",
    "STAT_NAMES",
    "SequentialCalibration",
    "StatsAccumulator",
    "TensorStore",
    "baseline_logits",
    "cache_root",
    "calibration_for",
    "calibration_key",
    "calibration_tokens",
    "capture",
    "digest",
    "model_fingerprint",
    "quant_cache_for",
    "tensor_fingerprint",
]

#: Bumped when the statistics' definition changes, so old cache files are never read.
STATS_VERSION = 1


@functools.lru_cache(maxsize=8)
def _store(root: str) -> TensorStore:
    return TensorStore(Path(root))


@functools.lru_cache(maxsize=8)
def _quant_cache(root: str) -> QuantCache:
    return QuantCache(Path(root))


def calibration_tokens(tokenizer: Any, cfg: CalibConfig) -> torch.Tensor:
    """The calibration sequences ``[n_samples, seq_len]``: windows of the source at random
    character offsets drawn with ``seed``, each tokenized on its own (the first, possibly cut,
    token dropped), so a large corpus is never tokenized as a whole."""
    from hpsearch.textdata import load_text

    text = load_text(cfg.source, "calib.source")
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    chars = cfg.seq_len * 8
    while len(rows) < cfg.n_samples:
        if chars > 4 * len(text) + 64:
            raise ConfigError("calib.source", f"{cfg.source!r} is too short for seq_len={cfg.seq_len}")
        start = int(torch.randint(0, max(1, len(text) - chars), (1,), generator=gen))
        ids = tokenizer(text[start : start + chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < cfg.seq_len + 1:
            chars *= 2  # sparse tokens for this text: wider windows from now on
            continue
        rows.append(torch.tensor(ids[1 : cfg.seq_len + 1], dtype=torch.long))
    return torch.stack(rows)


def _source_identity(source: str) -> dict[str, Any]:
    """A local file's size and modification time join the key, so an edited file is re-read."""
    path = Path(source).expanduser()
    if not source.startswith(("embedded:", "hf:")) and path.is_file():
        st = path.stat()
        return {"file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns}
    return {}


def _tokenizer_identity(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return digest([type(tokenizer).__name__, sorted(vocab.items())])


def calibration_key(model: nn.Module, cfg: CalibConfig, tokenizer: Any = None) -> tuple[str, dict[str, Any]]:
    """``(key, what it describes)`` of the statistics of ``model`` on ``cfg``'s calibration set."""
    dtype = next(iter(model.parameters())).dtype
    describes = {"version": STATS_VERSION, "model": model_fingerprint(model), "dtype": str(dtype), **cfg.identity(),
                 **_source_identity(cfg.source),
                 "tokenizer": None if tokenizer is None else _tokenizer_identity(tokenizer)}
    return digest(describes), describes


def calibration_for(ctx: Any, needs: Iterable[str], *, counter: list[int] | None = None):
    """The calibration statistics a trial's stages need (cached, or captured now).

    Args:
        ctx: the trial's :class:`~hpsearch.stages.base.StageContext`; reads ``calib`` (the
            ``calib`` config node), ``source_model`` (the uncompressed model), ``structure``,
            ``tokenizer`` and ``device``.
        needs: names of the statistics (``hessian``, ``mean_abs``, ``max_abs``); all three are
            captured together (one pass), so the cache entry serves every method.
        counter: ``counter[0]`` is increased per calibration forward pass (tests count them).

    Returns:
        A :class:`CachedCalibration` (or a :class:`SequentialCalibration` when
        ``calib.sequential``), with ``layer(name) -> LayerStats`` and ``for_model(model)``.
    """
    unknown = sorted(set(needs) - set(STAT_NAMES))
    if unknown:
        raise ConfigError("stages", f"a stage requires calibration statistic {unknown[0]!r}; known: {', '.join(STAT_NAMES)}")
    cfg = CalibConfig.from_mapping(getattr(ctx, "calib", None))
    model = getattr(ctx, "source_model", None)
    if model is None:
        raise ValueError("calibration_for needs ctx.source_model, the uncompressed model")
    if cfg.sequential:
        ids = calibration_tokens(ctx.tokenizer, cfg)
        return SequentialCalibration(ctx.structure, ids, cfg.batch_size, ctx.device)
    key, describes = calibration_key(model, cfg, ctx.tokenizer)
    names = [li.name for li in ctx.structure.linears]

    def compute():
        ids = calibration_tokens(ctx.tokenizer, cfg)
        return capture(model, ids, names, batch_size=cfg.batch_size, device=ctx.device,
                       progress=cfg.progress, counter=counter)

    return _store(str(cfg.cache_path)).calibration(key, describes, compute)


def quant_cache_for(calib_cfg: Any) -> QuantCache:
    """The process's quantized-weight cache for the cache directory of a ``calib`` config node."""
    return _quant_cache(str(CalibConfig.from_mapping(calib_cfg).cache_path))


@torch.no_grad()
def baseline_logits(model: nn.Module, blocks: torch.Tensor, *, calib_cfg: Any = None, batch_size: int = 8,
                    device: torch.device | None = None) -> torch.Tensor:
    """The uncompressed ``model``'s logits (float16, ``[n, seq_len, vocab]``, on CPU) on evaluation
    ``blocks``, cached by (model content, tokens) like the statistics, for KL objectives."""
    device = device or next(iter(model.parameters())).device
    describes = {"version": STATS_VERSION, "model": model_fingerprint(model), "tokens": tensor_fingerprint(blocks)}

    def compute() -> torch.Tensor:
        out = [model(input_ids=blocks[s : s + batch_size].to(device), use_cache=False).logits.half().cpu()
               for s in range(0, blocks.shape[0], batch_size)]
        return torch.cat(out)

    root = CalibConfig.from_mapping(calib_cfg).cache_path
    return _store(str(root)).tensor("logits", digest(describes), describes, compute)
