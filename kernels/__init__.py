"""Packed low-bit weights and the kernels that multiply by them.

The format (:class:`PackedWeight`, built by :func:`pack` from the quantization stages' codes,
scales and zeros) stores 2, 3, 4 or 8-bit codes at exactly that many bits, with group-wise
float16 scales and packed integer zeros: ``W_hat = (q - z) * s``. Every operation has a PyTorch
reference (:func:`pack`, :func:`unpack`, :func:`dequantize`, :func:`matmul_reference`);
:func:`packed_matmul` runs Triton kernels on CUDA (a GEMV for one row, a tensor-core tile kernel
for more) and the reference elsewhere. :class:`PackedLinear` is the ``nn.Linear`` replacement a
packed model is built from:

.. code-block:: python

    layer = PackedLinear.from_quantized(q, s, z, bits=4, group_size=128, bias=None)
    y = layer(x)          # x: [..., K] float16 / bfloat16 on the layer's device
    layer.nbytes()        # exact storage bytes

:func:`fuse_packed_siblings` then runs the packed layers that read one input (q/k/v, gate/up) as
one kernel launch each, without touching the model's code, and :func:`fuse_gated_mlps` folds a
Llama-family MLP's ``silu(gate) * up`` into its gate/up launch (:func:`packed_gated_matmul`), and
:func:`fuse_rope_attention` a Llama-family attention's rotary embedding and KV-cache write into its
q/k/v launch at decode steps (:func:`packed_qkv_rope`).

:func:`decode_attention` is split-KV attention of a few new tokens over a KV cache (the
``hpsearch::decode_attention`` op), and :func:`use_decode_attention` switches a transformers model's
decode steps to it (prefill stays on SDPA). :func:`use_additive_mask` keeps SDPA but builds its
additive mask once a forward pass rather than once a layer.
"""

import sys as _sys

if __name__ == "kernels":
    # This directory is hpsearch.kernels (pyproject's package-dir). It is imported as the top-level
    # ``kernels`` only when a checkout's root is on sys.path (``python -m ...`` run there) and
    # something asks for Hugging Face's ``kernels`` distribution, as transformers >= 5.25 does for
    # every model (``transformers.integrations.hub_kernels``). Hand the name to that distribution;
    # where it is not installed, stay an empty module (no ``__version__``: "not installed" to
    # transformers), not hpsearch.kernels under a second name.
    from ._shadowed import load_shadowed as _load_shadowed

    _shadowed = _load_shadowed(__file__)
    if _shadowed is not None:
        _sys.modules["kernels"] = _shadowed
else:
    from ._additive_mask import use_additive_mask
    from ._attention import decode_attention, use_decode_attention
    from ._format import SUPPORTED_BITS, PackedWeight
    from ._gated import gated_reference, packed_gated_matmul
    from ._gated_mlp import fuse_gated_mlps, unfuse_gated_mlps
    from ._launch import KernelConfig, choose_config, fingerprint, packed_matmul, triton_enabled
    from ._linear import PackedLinear
    from ._pack import pack, unpack
    from ._reference import dequantize, matmul_reference
    from ._rope import packed_qkv_rope, qkv_rope_reference
    from ._rope_attention import fuse_rope_attention, unfuse_rope_attention
    from ._siblings import PackedSibling, PackedSiblings, fuse_packed_siblings

__all__ = [
    "SUPPORTED_BITS",
    "KernelConfig",
    "PackedLinear",
    "PackedSibling",
    "PackedSiblings",
    "PackedWeight",
    "choose_config",
    "decode_attention",
    "dequantize",
    "fingerprint",
    "fuse_gated_mlps",
    "fuse_packed_siblings",
    "fuse_rope_attention",
    "gated_reference",
    "matmul_reference",
    "pack",
    "packed_gated_matmul",
    "packed_matmul",
    "packed_qkv_rope",
    "qkv_rope_reference",
    "triton_enabled",
    "unfuse_gated_mlps",
    "unfuse_rope_attention",
    "unpack",
    "use_additive_mask",
    "use_decode_attention",
]
