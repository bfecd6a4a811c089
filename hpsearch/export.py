"""Ship a trial: rebuild its compressed model from the study and write it out.

``python -m hpsearch.export --storage sqlite:///multirun/hpsearch.db --study NAME --trial N --out DIR [--packed]``
(or ``--config JOB_DIR/.hydra/config.yaml`` instead of the storage, study and trial)

A study keeps no weights, only what each trial did; the trial's job directory (next to its
``manifest.json``, the path the trial records) holds the config it ran with. This runs that
config's stages again with the trial's seed (calibration statistics and per-layer results come from
the caches, so it costs a warm trial) and writes to ``DIR``:

- the model with its compressed weights in the model's dtype, as ``save_pretrained`` writes it
  (config, safetensors, generation config, tokenizer): it loads with transformers alone;
- ``manifest.json``: what was done to each layer;
- ``export.json``: where it came from, and a check: the saved checkpoint reloaded with
  transformers against the rebuilt model's logits on a fixed prompt. What a checkpoint of weights
  cannot hold says so there (KV-cache formats are applied at run time; adapters left unmerged on
  compressed layers are peft modules);
- with ``--packed``: ``packed.safetensors`` and ``packed.json``, every quantized linear in the packed
  format (real low-bit storage, the Triton kernels on CUDA); :func:`load_packed` loads the
  checkpoint with them in place of its linears.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export_trial", "job_config", "load_packed", "main"]

#: prompt of the reload check: fixed token ids, within any vocabulary of 32+ tokens
_CHECK_IDS = [[1, 5, 9, 2, 30, 17, 3, 11, 25, 8, 6, 14]]


class ExportError(ValueError):
    """A bad ``--storage``/``--study``/``--trial``/``--config``: one line naming it."""


def job_config(storage: str, study: str, trial: int) -> Path:
    """The config file a finished trial ran with (``<job dir>/.hydra/config.yaml``)."""
    import optuna

    from hpsearch.study import open_storage

    try:
        loaded = optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat_interval=None))
    except KeyError as e:
        raise ExportError(f"--study: no study {study!r} in {storage}") from e
    numbers = [t.number for t in loaded.trials]
    if trial not in numbers:
        raise ExportError(f"--trial: study {study!r} has no trial {trial}; it has {min(numbers, default=0)}.."
                          f"{max(numbers, default=-1)}")
    frozen = loaded.trials[numbers.index(trial)]
    manifest = frozen.user_attrs.get("manifest")
    if frozen.state.name != "COMPLETE" or not manifest:
        raise ExportError(f"--trial: trial {trial} is {frozen.state.name}, not a complete trial with a manifest")
    config = Path(manifest).parent / ".hydra" / "config.yaml"
    if not config.exists():
        raise ExportError(f"--trial: trial {trial}'s job config {config} is gone (its job directory was moved or "
                          "deleted); pass --config to a copy of it")
    return config


def export_trial(config: str | Path, out: str | Path, packed: bool = False) -> dict[str, Any]:
    """Rebuild the compressed model of the job config ``config`` and write it to ``out``; returns
    what ``export.json`` records."""
    from omegaconf import OmegaConf

    from hpsearch.trial import compressed_model

    config, out = Path(config), Path(out)
    if not config.is_file():
        raise ExportError(f"--config: {config} is not a file")
    cfg = OmegaConf.load(config)
    if "trial" not in cfg or "model" not in cfg:
        raise ExportError(f"--config: {config} is not a trial's job config (no 'trial' or 'model' key)")
    built = compressed_model(cfg)
    model, loaded = built.model, built.loaded
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    built.manifest.model.setdefault("plan_params", built.params)
    built.manifest.save(out / "manifest.json")
    record: dict[str, Any] = {
        "config": str(config),
        "model": loaded.name,
        "trial": cfg.trial.get("number"),
        "study": cfg.trial.get("study"),
        "stages": [stage["name"] for stage in built.manifest.stages],
        "reload_check": _reload_check(model, out, loaded.dtype),
        "runtime_only": _runtime_only(built),
    }
    if packed:
        record["packed"] = _write_packed(model, built.ctx.artifacts.get("quantized") or {}, out)
    (out / "export.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def _reload_check(model: nn.Module, out: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The saved checkpoint, loaded by transformers alone, against the rebuilt model on a fixed prompt."""
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    ids = torch.tensor(_CHECK_IDS, device=device) % model.config.vocab_size
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), reloaded(input_ids=ids).logits.float()
    diff = (a - b).abs().max().item()
    return {"max_abs_logit_diff": diff, "equal": diff == 0.0}


def _runtime_only(built) -> list[str]:
    """What the trial applied that a checkpoint of weights does not hold."""
    notes = []
    kv = built.manifest.model.get("kv_cache") or {}
    per_layer = kv.get("per_layer") or [kv]
    if any(min(int(layer.get("k_bits") or 16), int(layer.get("v_bits") or 16)) < 16 for layer in per_layer):
        bits = sorted({(int(layer.get("k_bits") or 16), int(layer.get("v_bits") or 16)) for layer in per_layer})
        notes.append(f"KV cache quantized (keys/values bits per layer: {', '.join(f'{k}/{v}' for k, v in bits)}; "
                     f"layout {kv.get('layout')}): applied when decoding, by hpsearch.kvcache")
    lora = built.ctx.artifacts.get("lora") or {}
    unmerged = sorted(set(lora.get("ranks") or {}) - set(lora.get("merged") or []))
    if unmerged:
        notes.append(f"{len(unmerged)} LoRA adapters left unmerged on compressed layers (peft modules in the "
                     "saved weights; transformers alone loads the base layers only)")
    return notes


def _write_packed(model: nn.Module, quantized: dict, out: Path) -> dict[str, Any]:
    """Pack ``model``'s quantized linears in place (the checkpoint is written and checked by now, so
    no second copy of the model is made) and write ``packed.safetensors`` (every packed linear's
    codes, scales, zeros, bias, input scale) and ``packed.json`` (their shapes and formats, and why
    any quantized layer stayed dense)."""
    from safetensors.torch import save_file

    from hpsearch.kernels import PackedLinear
    from hpsearch.packing import pack_model

    outcome = pack_model(model, quantized)
    layers, tensors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            dtype = module.bias.dtype if module.bias is not None else (
                module.in_scale.dtype if module.in_scale is not None else torch.float16)
            layers[name] = {"in_features": module.in_features, "out_features": module.out_features,
                            "bits": module.bits, "group_size": module.group_size, "bias": module.bias is not None,
                            "in_scale": module.in_scale is not None, "dtype": str(dtype).split(".")[-1]}
            tensors.update({f"{name}.{key}": t.contiguous() for key, t in module.state_dict().items()})
    save_file(tensors, str(out / "packed.safetensors"))
    (out / "packed.json").write_text(json.dumps({"layers": layers, "outcome": outcome}, indent=1))
    return {"packed_layers": len(layers), "dense": {k: v for k, v in outcome.items() if not v.startswith("packed")},
            "packed_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def load_packed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The model :func:`export_trial` wrote with ``packed=True``: the checkpoint, its quantized
    linears replaced by the ``PackedLinear`` layers of ``packed.safetensors``. On a GPU, call
    :func:`hpsearch.kernels.fuse_packed_siblings` and the other fusions on it before decoding, as
    :func:`hpsearch.packing.pack_model` does with ``example``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hpsearch.kernels import PackedLinear

    path = Path(path)
    layers = json.loads((path / "packed.json").read_text())["layers"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    tensors = load_file(str(path / "packed.safetensors"))
    for name, spec in layers.items():
        layer = PackedLinear(spec["in_features"], spec["out_features"], bits=spec["bits"], group_size=spec["group_size"],
                             bias=spec["bias"], in_scale=spec["in_scale"], device="meta",
                             dtype=getattr(torch, spec["dtype"]))
        layer.load_state_dict({key: tensors[f"{name}.{key}"] for key in layer.state_dict()}, assign=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpsearch.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", help="the study's storage URL, e.g. sqlite:///multirun/hpsearch.db")
    p.add_argument("--study", help="the study's name")
    p.add_argument("--trial", type=int, help="the trial's number")
    p.add_argument("--config", help="a trial's job config (<job dir>/.hydra/config.yaml) instead of the three above")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--packed", action="store_true", help="also write the packed low-bit layers")
    a = p.parse_args(argv)
    try:
        if a.config is None:
            missing = [f"--{k}" for k in ("storage", "study", "trial") if getattr(a, k) is None]
            if missing:
                raise ExportError(f"{missing[0]}: needed without --config (give --storage, --study and --trial, "
                                  "or --config)")
            config = job_config(a.storage, a.study, a.trial)
        else:
            config = a.config
        record = export_trial(config, a.out, packed=a.packed)
    except ExportError as e:
        print(f"hpsearch.export: error: {e}", file=sys.stderr)
        return 2
    check = record["reload_check"]
    same = "the same logits" if check["equal"] else f"max logit difference {check['max_abs_logit_diff']:.3g}"
    packed = f"; packed: {record['packed']['packed_layers']} layers" if "packed" in record else ""
    print(f"wrote {a.out}: {record['model']} after {', '.join(record['stages']) or 'no stages'}; "
          f"reloaded with transformers: {same}{packed}")
    for note in record["runtime_only"]:
        print(f"not in the checkpoint: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
