"""Every address an interpreted Triton kernel touches lies inside a tensor passed to it.

Why: a load whose value is thrown away (``tl.where`` picks the other branch) gives the right
answer, so comparing with the reference cannot see it, yet on the GPU it reads past the tensor and
faults where the allocation ends at unmapped memory. kernels/NOTES.md run 34: a 3-bit zero read one
plane past its unit faulted in one memory layout in twenty. Under ``TRITON_INTERPRET=1`` every load
and store goes through the interpreter's builder, so its addresses can be checked against the
storages of the launch's tensor arguments, exactly, on CPU.

Case scripts call :func:`install` before anything compiles and put :func:`report` in their output.
It uses the interpreter's ``GridExecutor`` and ``InterpreterBuilder`` (Triton 3.6-3.9); where they
are missing, :func:`install` says so and nothing is checked.
"""

from __future__ import annotations

import numpy as np

_state: dict = {"kernel": "", "lo": np.zeros(0, np.uint64), "hi": np.zeros(0, np.uint64)}
_violations: dict[tuple[str, str], dict] = {}


def _storages(args) -> list[tuple[int, int]]:
    out = []
    for arg in args:
        if isinstance(arg, (tuple, list)):
            out += _storages(arg)
        elif hasattr(arg, "untyped_storage"):
            st = arg.untyped_storage()
            out.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    return out


def _check(op: str, ptrs, mask, itemsize: int) -> None:
    addr = np.asarray(ptrs.data, dtype=np.uint64).ravel()
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()]
    if addr.size == 0:
        return
    lo, hi = _state["lo"], _state["hi"]
    idx = np.searchsorted(lo, addr, side="right").astype(np.int64) - 1
    inside = (idx >= 0) & (addr + np.uint64(itemsize) <= hi[np.maximum(idx, 0)])
    if inside.all():
        return
    bad = addr[~inside]
    v = _violations.setdefault((_state["kernel"], op), {"kernel": _state["kernel"], "op": op, "count": 0})
    v["count"] += int(bad.size)
    # how far past the nearest tensor end below it, for the message
    j = np.maximum(np.searchsorted(lo, bad, side="right").astype(np.int64) - 1, 0)
    v["bytes_past_end"] = int(np.max(bad.astype(np.int64) - hi[j].astype(np.int64) + itemsize))


def install() -> bool:
    """Check every interpreted load, store and atomic from now on; False where this Triton's
    interpreter lacks the hooks."""
    try:
        from triton.runtime import interpreter as it
    except ImportError:
        return False
    builder, executor = getattr(it, "InterpreterBuilder", None), getattr(it, "GridExecutor", None)
    needed = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    if builder is None or executor is None or not hasattr(executor, "_init_args_hst") \
            or not all(hasattr(builder, n) for n in needed):
        return False

    init = executor._init_args_hst

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges = sorted(_storages(list(args_hst) + list(kwargs_hst.values())))
        _state.update(kernel=getattr(self.fn, "__name__", str(self.fn)),
                      lo=np.array([r[0] for r in ranges], np.uint64), hi=np.array([r[1] for r in ranges], np.uint64))
        return args_hst, kwargs_hst

    def size(ptrs) -> int:
        return np.dtype(it._get_np_dtype(ptrs.get_element_ty())).itemsize

    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def masked_load(self, ptrs, mask, other, *a, **k):
        _check("load", ptrs, mask, size(ptrs))
        return load(self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        _check("store", ptrs, mask, size(ptrs))
        return store(self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self, op, ptr, val, mask, *a, **k):
        _check("atomic", ptr, mask, size(ptr))
        return rmw(self, op, ptr, val, mask, *a, **k)

    def atomic_cas(self, ptr, cmp, val, *a, **k):
        _check("atomic", ptr, None, size(ptr))
        return cas(self, ptr, cmp, val, *a, **k)

    executor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    return True


def report() -> list[dict]:
    """The kernels that touched memory outside their tensors: kernel, op, count, bytes past the end."""
    return sorted(_violations.values(), key=lambda v: (v["kernel"], v["op"]))
