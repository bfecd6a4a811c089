"""PackedLinear on CPU (the reference path): construction, forward, storage, compile capture."""

from __future__ import annotations

import pytest
import torch
from hpsearch.kernels import PackedLinear, dequantize, matmul_reference, pack
from packed_cases import random_qsz, rel_err, w_hat_f64


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_quantized_forward(bits):
    q, s, z = random_qsz(40, 96, 32, bits)
    bias = torch.randn(40).half()
    layer = PackedLinear.from_quantized(q, s, z, bits, 32, bias=bias)
    x = torch.randn(2, 3, 96).half()
    y = layer(x)
    ref = x.double() @ w_hat_f64(q, s, z, 32).T + bias.double()
    assert y.shape == (2, 3, 40) and y.dtype == torch.float16
    assert rel_err(y, ref) < 1e-3


def test_in_scale_divides_activations():
    q, s, z = random_qsz(16, 64, 32, 4)
    in_scale = (torch.rand(64) + 0.5).half()
    layer = PackedLinear.from_quantized(q, s, z, 4, 32, in_scale=in_scale)
    x = torch.randn(3, 64).half()
    ref = (x.double() / in_scale.double()) @ w_hat_f64(q, s, z, 32).T
    assert rel_err(layer(x), ref) < 2e-3


def test_nbytes_counts_every_buffer():
    q, s, z = random_qsz(64, 256, 128, 4)
    layer = PackedLinear.from_quantized(q, s, z, 4, 128, bias=torch.zeros(64).half())
    assert layer.nbytes() == pack(q, s, z, 4, 128).nbytes() + 64 * 2
    assert layer.nbytes() == sum(b.numel() * b.element_size() for b in layer.state_dict().values())


def test_state_dict_round_trip_into_empty_layer():
    q, s, z = random_qsz(24, 256, 128, 3)
    src = PackedLinear.from_quantized(q, s, z, 3, 128)
    dst = PackedLinear(256, 24, bits=3, group_size=128)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dequantize(dst.packed), dequantize(src.packed))
    assert "bits=3" in repr(dst)


def test_torch_compile_fullgraph_captures_the_op():
    q, s, z = random_qsz(32, 128, 64, 4)
    layer = PackedLinear.from_quantized(q, s, z, 4, 64)
    x = torch.randn(4, 128).half()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    assert torch.equal(layer(x), matmul_reference(x, layer.packed))


def test_bad_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size"):
        PackedLinear(96, 8, bits=4, group_size=64)


def test_fingerprint_names_the_tile_table_in_use(tmp_path, monkeypatch):
    """Cached layer timings are keyed by it: another tile table must give another fingerprint."""
    from hpsearch.kernels import _launch, fingerprint

    base = fingerprint()
    assert len(base) == 12 and int(base, 16) >= 0 and fingerprint() == base
    table = tmp_path / "tuned.json"
    table.write_text('{"1:4096x4096:4": {"kind": "gemv_h2", "block_n": 8, "block_k": 2048}}')
    monkeypatch.setenv("HPSEARCH_KERNEL_TUNING", str(table))
    _launch._tuned_table.cache_clear()
    _launch.fingerprint.cache_clear()
    try:
        assert fingerprint() != base
    finally:
        monkeypatch.delenv("HPSEARCH_KERNEL_TUNING")
        _launch._tuned_table.cache_clear()
        _launch.fingerprint.cache_clear()
    assert fingerprint() == base
