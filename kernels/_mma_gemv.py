"""Packed products of 1-16 float16 activation rows on tensor cores, in CUDA C (``_mma_gemv.cu``).

Why a CUDA kernel beside the Triton ones: at one row the Triton GEMVs spend 4.4-4.7 warp
instructions a code and are bound by their own execution (``ncu``, kernels/NOTES.md run 39). In
``_mma_gemv.cu`` every instruction of the loop is chosen: one ``lop3`` and one ``fma.f16x2`` turn a
code pair into the exact float16 pair ``q - z``, and ``mma.sync.m16n8k16`` takes 16 weight rows by
up to 8 tokens (two such tiles for 9-16 tokens) with float32 sums, so the activations cost nothing
per code. Neither a library kernel nor Triton gives that for this format at 2, 3, 4 and 8 bits
(kernels/NOTES.md: tinygemm is 4-bit bfloat16 only and slower than ``gemv_h2``; Marlin-family
kernels are 4- and 8-bit and need their own weight layout, a second copy of every layer).

The kernel is built at first use with the CUDA toolkit's ``nvcc`` into a shared library (no torch
headers, about 12 seconds for its 32 variants), cached under ``$HPSEARCH_CUDA_CACHE`` (default
``~/.cache/hpsearch/cuda``) by source hash and GPU architecture, and launched through ``ctypes`` on
torch's current stream, so CUDA graphs capture it like any other kernel. Where no ``nvcc`` is found,
the build fails, or ``HPSEARCH_CUDA_KERNELS=0``, :func:`takes` is false and the Triton kernels run.
By default (``auto``) it runs only the products the measured table (``_tuned``) gives it: where it
was timed faster than the Triton kernels; ``HPSEARCH_CUDA_KERNELS=1`` sends it every product it
takes (kernels/NOTES.md run 40 has the measurements).

Requirements (:func:`takes`): a CUDA device of compute capability 8.0 or newer, float16 activations
with unit stride and 16-byte aligned rows, 1-16 rows, 2, 3, 4 or 8 bits, a power-of-two group size
of at least one chunk (32 codes, 16 at 8 bits) or one group a row.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["ARGTYPES", "MAX_ROWS", "MAX_WARPS", "build", "chunk_codes", "enabled", "launch", "library", "mode", "nvcc",
           "step_codes", "takes"]

#: Activation rows a launch takes (two token tiles of the MMA's 8 columns).
MAX_ROWS = 16
#: Warps a block may split K across.
MAX_WARPS = 16

_SOURCE = Path(__file__).with_name("_mma_gemv.cu")
#: ``hps_mma_gemv``'s parameters: bits, scale_after, warps, depth; x, qweight, scales, qzeros, bias, y; m, n,
#: k, groups, gshift, x_stride, y_stride, row_words, plane_words, zrow_words, zplane; stream.
ARGTYPES = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 11 + [ctypes.c_void_p]


def chunk_codes(bits: int) -> int:
    """Codes of one row a thread takes per step."""
    return 16 if bits == 8 else 32


def step_codes(bits: int) -> int:
    """Codes of every row a warp covers per step (four threads' chunks)."""
    return 4 * chunk_codes(bits)


def mode() -> str:
    """``HPSEARCH_CUDA_KERNELS``: ``"auto"`` (default: the kernel takes the products the measured
    table gives it, ``cu1:`` / ``cu16:`` entries of ``_tuned``), ``"1"`` (every 1-16 row product it
    can take) or ``"0"`` (never); other values are refused."""
    value = os.environ.get("HPSEARCH_CUDA_KERNELS", "auto")
    if value not in ("0", "1", "auto"):
        raise ValueError(f"HPSEARCH_CUDA_KERNELS={value!r} is not allowed; allowed: 'auto' (default: where the "
                         f"measured table says), '1' (every product it takes) or '0' (off)")
    return value


def enabled() -> bool:
    """Whether the CUDA kernel may run at all (``HPSEARCH_CUDA_KERNELS`` is not ``0``)."""
    return mode() != "0"


def nvcc() -> str | None:
    """The ``nvcc`` that builds the kernel: ``$CUDA_HOME/bin/nvcc``, else the one on ``PATH``, else
    ``/usr/local/cuda/bin/nvcc``; None if there is none."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def build(arch: str, out: Path, compiler: str | None = None) -> Path:
    """Compile ``_mma_gemv.cu`` for ``arch`` (e.g. ``"90"``) into the shared library ``out``.

    Raises ``RuntimeError`` with nvcc's message if it fails."""
    compiler = compiler or nvcc()
    if compiler is None:
        raise RuntimeError("no nvcc found (set CUDA_HOME to a CUDA toolkit)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        cmd = [compiler, "-O3", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-o", str(part), str(_SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
        os.replace(part, out)  # atomic: concurrent builders never load a half-written library
    return out


@functools.cache
def library(device_index: int = 0) -> ctypes.CDLL | None:
    """The built kernel library for the GPU ``device_index`` (built once per source and architecture),
    or None (with one warning saying why) where it cannot be built."""
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return None
    arch = f"{major}{minor}"
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("HPSEARCH_CUDA_CACHE", Path.home() / ".cache" / "hpsearch" / "cuda"))
    path = cache / f"mma_gemv_{digest}_sm{arch}.so"
    try:
        if not path.is_file():
            build(arch, path)
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"hpsearch: the CUDA packed kernel is unavailable, the Triton kernels run instead: {e}",
                      stacklevel=2)
        return None
    lib.hps_mma_gemv.restype = ctypes.c_int
    lib.hps_mma_gemv.argtypes = ARGTYPES
    return lib


def takes(x2: torch.Tensor, bits: int, group_size: int, in_features: int) -> bool:
    """Whether :func:`launch` runs this product (see the module docstring)."""
    if not (x2.is_cuda and x2.dtype == torch.float16 and 1 <= x2.shape[0] <= MAX_ROWS and bits in (2, 3, 4, 8)):
        return False
    if x2.stride(1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8) or x2.data_ptr() % 16:
        return False  # 16-byte activation loads
    per_channel = group_size >= in_features
    if not per_channel and (group_size & (group_size - 1) or group_size < chunk_codes(bits)):
        return False
    if not enabled():
        return False
    return library(x2.device.index or 0) is not None


def launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
           bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, warps: int,
           depth: int = 1) -> torch.Tensor:
    """``x2 [M, K] @ W_hat.T (+ bias)`` as float16 ``[M, N]``; the caller checked :func:`takes`.

    A block takes 16 weight rows and splits K across ``warps`` warps (1-16); each warp requests its
    weights ``depth`` steps (1 or 2) ahead of their use."""
    if not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"warps={warps} is not allowed; allowed: 1-{MAX_WARPS}")
    if depth not in (1, 2):
        raise ValueError(f"depth={depth} is not allowed; allowed: 1 or 2")
    m, k = x2.shape
    n, g = scales.shape
    per_channel = group_size >= in_features
    gshift = 30 if per_channel else group_size.bit_length() - 1
    scale_after = per_channel or group_size % step_codes(bits) == 0
    row_words = qweight.shape[1]
    plane_words = row_words // 3 if bits == 3 else row_words
    zrow_words = qzeros.shape[1]
    zplane = zrow_words // 3 if bits == 3 else zrow_words
    if qweight.stride(1) != 1 or qweight.stride(0) != row_words or qweight.data_ptr() % 16:
        qweight = qweight.contiguous()
    scales, qzeros = scales.contiguous(), qzeros.contiguous()
    y = torch.empty((m, n), dtype=torch.float16, device=x2.device)
    b = bias.to(torch.float16).contiguous() if bias is not None else None
    with torch.cuda.device(x2.device):  # the library's runtime launches on the thread's current device
        stream = torch.cuda.current_stream(x2.device).cuda_stream
        err = library(x2.device.index or 0).hps_mma_gemv(
            bits, int(scale_after), warps, depth, x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
            qzeros.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(), m, n, k, g, gshift,
            x2.stride(0), y.stride(0), row_words, plane_words, zrow_words, zplane, stream)
    if err:
        raise RuntimeError(f"hps_mma_gemv launch failed: CUDA error {err}")
    return y
