"""Loading the model under study: the embedded default, a local directory or a hub id.

A process loads each (model, dtype, device) once and keeps it; trials work on a copy
(:func:`fresh_copy`), so the pristine weights are never touched and a trial never pays for
loading. Names are resolved and configs read without loading weights, so bad input fails fast.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpsearch.errors import ConfigError

__all__ = [
    "EMBEDDED_NAME",
    "LoadedModel",
    "resolve_name",
    "load_config",
    "resolve_dtype",
    "resolve_device",
    "load_model",
    "fresh_copy",
]

EMBEDDED_NAME = "hpsearch/embedded-llama"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_name(name_or_path: str) -> str:
    """The path or hub id transformers should open for ``model.name_or_path``."""
    if name_or_path in (EMBEDDED_NAME, "embedded"):
        from hpsearch.zoo import EMBEDDED_DIR

        return str(EMBEDDED_DIR)
    return os.path.expanduser(name_or_path)


@functools.lru_cache(maxsize=8)
def load_config(name_or_path: str):
    """The model's transformers config, read without weights; a one-line error when it can't be."""
    from transformers import AutoConfig

    path = resolve_name(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).is_dir():
        raise ConfigError(
            "model.name_or_path",
            f"{name_or_path!r} is not a directory; give a local model directory, a hub id "
            f"(e.g. Qwen/Qwen2.5-0.5B) or {EMBEDDED_NAME!r}",
        )
    if not looks_local and not _in_hub_cache(path) and not _hub_reachable():
        raise ConfigError(
            "model.name_or_path",
            f"{name_or_path!r} is not a local directory, not in the Hugging Face cache, and the hub "
            f"cannot be reached from this machine; give a local model directory or {EMBEDDED_NAME!r}",
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            "model.name_or_path",
            f"cannot open {name_or_path!r} ({reason[:160]}); give a local model directory, "
            f"a hub id reachable from this machine, or {EMBEDDED_NAME!r}",
        ) from None
    return config


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub, instead of transformers' retries with back-off
    (about 30 s) before a machine without the hub learns it has none."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError("model.device", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device", f"{device!r} asked for but no CUDA device is present; use auto or cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (16-bit matmuls are slow there) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError("model.dtype", f"{dtype!r} is not allowed; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(eq=False)
class LoadedModel:
    """A loaded model with what trials need beside it."""

    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


@functools.lru_cache(maxsize=2)
def _load(name_or_path: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_name(name_or_path)
    load_config(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(name_or_path, model, tokenizer, device, dtype)


def load_model(model_cfg: Any) -> LoadedModel:
    """Load (once per process) the model a ``model`` config group entry names."""
    device = resolve_device(str(model_cfg.get("device", "auto")))
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")), device)
    return _load(str(model_cfg.name_or_path), dtype, device)


def fresh_copy(loaded: LoadedModel):
    """A copy of the pristine model for one trial to compress."""
    return copy.deepcopy(loaded.model)
