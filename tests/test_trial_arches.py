"""One trial end to end (compose -> stages -> objectives -> manifest) on several architectures."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from conftest import ARCHES
from hpsearch.trial import run_trial


@pytest.mark.parametrize("arch", ARCHES)
def test_trial_on_architecture(arch, model_dir_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hpsearch.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model.name_or_path={model_dir_factory(arch)}", "search=quickstart", "logging.wandb=false",
            "objectives.perplexity.max_tokens=512", "trial.params={bits.mlp.down_proj:3,group_size.mlp.down_proj:32}"])
    result = run_trial(cfg)
    values = result["values"]
    assert set(values) == {"perplexity", "memory_gb", "latency_ms"}
    assert all(v > 0 for v in values.values())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    down = [r for r in manifest["layers"].values() if r["kind"] == "mlp.down_proj"]
    assert down and all(r["bits"] == 3 and r["group_size"] == 32 for r in down)
    assert all(r["bits"] == 16 for r in manifest["layers"].values() if r["kind"] != "mlp.down_proj")
