"""Measured latency: formats per layer, the labelled roofline fallback on CPU, and (GPU) timings."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from hpsearch.manifest import Manifest
from hpsearch.objectives.base import EvalContext
from hpsearch.objectives.latency import decode_seconds
from hpsearch.objectives.measured_latency import LayerTimer, MeasuredLatency, layer_format
from hpsearch.objectives.profiles import get_profile
from hpsearch.structure import structure_from_config


@pytest.mark.parametrize("record,fmt", [
    ({"bits": 16, "in_features": 64}, "dense"),
    ({"bits": 4, "group_size": 128, "in_features": 256}, "packed4g128"),
    ({"bits": 3, "group_size": None, "in_features": 96}, "packed3g96"),
    ({"bits": 16, "pattern": "2:4", "sparsity": 0.5, "in_features": 64}, "semi24"),
    ({"bits": 16, "pattern": "unstructured", "sparsity": 0.5, "in_features": 64}, "dense"),
])
def test_layer_format(record, fmt):
    assert layer_format(record) == fmt


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_without_cuda_it_is_the_labelled_roofline():
    s = structure_from_config(small_config("llama", 256))
    manifest = Manifest.for_structure("x", s)
    ctx = EvalContext(s, manifest, None, torch.device("cpu"), {})
    value = MeasuredLatency(profile="a100", context=64).evaluate(None, ctx)
    assert value == pytest.approx(decode_seconds(s, manifest, get_profile("a100"), 1, 64) * 1e3)
    assert ctx.attrs["latency_source"].startswith("roofline:a100")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_timings_are_cached_and_low_bits_are_faster(tmp_path):
    timer = LayerTimer(tmp_path / "lat.json", inner=10, repeats=5)
    dense = timer.layer_us(11008, 4096, "dense", 1)
    packed = timer.layer_us(11008, 4096, "packed4g128", 1)
    assert 0 < packed < dense
    again = LayerTimer(tmp_path / "lat.json")
    assert again.layer_us(11008, 4096, "dense", 1) == dense  # from the cache file, not re-measured
