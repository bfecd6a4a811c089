"""Measured decode latency on the GPU: per-layer CUDA-graph timings assembled per trial.

A trial's decode step is timed as the sum of its linear layers, each in the format the manifest
gives it (16-bit dense, packed 2/3/4/8-bit, 2:4 semi-structured), plus the rest of the step
(attention over the KV cache, norms, embeddings, sampling head) measured once on the uncompressed
model under a static KV cache; for a trial with packed layers the rest is measured once a shape on
a packed copy with the fusions :func:`hpsearch.packing.pack_model` applies, less, at one-row decode,
what the trial's own fused epilogues save (:func:`_fused_remainder`; ``python -m hpsearch.bench
latency_assembly [--batch B]`` checks the sum against whole steps: within 3.3% at one row and 4.6%
at 4-16 rows on a 7B-shaped Llama, kernels/NOTES.md runs 31 and 33). Every
layer timing is a CUDA graph of ``inner`` back-to-back calls, replayed ``repeats`` times after warm-up; the median is kept. Timings are cached per (device, shape,
format, batch) in memory and in a JSON file, so after the first trials a trial pays for assembly
only. On a machine without CUDA the value is the roofline model's, labelled so in
``latency_source``; with CUDA the roofline's figure is reported beside it (``latency_roofline_ms``)
so the model's error can be read off every study.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpsearch.kernels._siblings import runs
from hpsearch.objectives.base import EvalContext, Objective
from hpsearch.objectives.latency import decode_seconds, prefill_seconds
from hpsearch.objectives.profiles import get_profile
from hpsearch.structure import ModelStructure

__all__ = ["LayerTimer", "MeasuredLatency", "layer_format", "rewind_static_cache"]


def layer_format(record: dict[str, Any]) -> str:
    """The kernel a layer runs with: ``dense``, ``semi24`` or ``packed<bits>g<group>``."""
    bits = int(record.get("bits") or 16)
    if bits < 16:
        return f"packed{bits}g{record.get('group_size') or record['in_features']}"
    if str(record.get("pattern")) == "2:4" and float(record.get("sparsity") or 0) > 0:
        return "semi24"
    return "dense"


def _graph_time_us(fn, inner: int, repeats: int, warmup: int = 3) -> float:
    """Median microseconds of one ``fn()`` call, from a CUDA graph of ``inner`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


class LayerTimer:
    """Times single linear layers of a given format on the current CUDA device, with a cache."""

    def __init__(self, cache_file: Path | None, inner: int = 20, repeats: int = 15) -> None:
        self.cache_file, self.inner, self.repeats = cache_file, inner, repeats
        self.device_name = torch.cuda.get_device_name()
        # timings go stale with the software that ran them: torch (cuBLAS, attention), and for packed
        # layers the kernels and their tile table (``hpsearch.kernels.fingerprint``)
        self.build = f"torch{torch.__version__}"
        self.times: dict[str, Any] = {}  # layer key -> microseconds; remainder key -> its record
        if cache_file is not None and cache_file.exists():
            self.times = json.loads(cache_file.read_text())

    def _save(self) -> None:
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.times, indent=0, sort_keys=True))
            os.replace(tmp, self.cache_file)

    def layer_us(self, n: int, k: int, fmt: str, m: int, dtype: torch.dtype = torch.float16) -> float:
        if fmt.startswith("packed"):
            from hpsearch.kernels import fingerprint

            fmt_key = f"{fmt}@{fingerprint()}"
        else:
            fmt_key = fmt
        key = f"{self.device_name}|{self.build}|{n}x{k}|{fmt_key}|m{m}|{str(dtype).split('.')[-1]}"
        if key not in self.times:
            self.times[key] = self._measure(n, k, fmt, m, dtype)
            self._save()
        return self.times[key]

    def _measure(self, n: int, k: int, fmt: str, m: int, dtype: torch.dtype) -> float:
        dev = torch.device("cuda")
        x = torch.randn(m, k, device=dev, dtype=dtype)
        if fmt == "dense":
            w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
            return _graph_time_us(lambda: torch.nn.functional.linear(x, w), self.inner, self.repeats)
        if fmt == "semi24":
            from torch.sparse import to_sparse_semi_structured

            mask = torch.tensor([1, 1, 0, 0], device=dev, dtype=torch.bool).repeat(n, k // 4)
            w = to_sparse_semi_structured(torch.randn(n, k, device=dev, dtype=dtype) * mask)
            return _graph_time_us(lambda: torch.nn.functional.linear(x, w), self.inner, self.repeats)
        from hpsearch.kernels import PackedLinear

        bits, group = (int(v) for v in fmt[len("packed"):].split("g"))
        g = group if k % group == 0 else k
        q = torch.randint(0, 2**bits, (n, k), device=dev, dtype=torch.uint8)
        s = (torch.rand(n, k // g, device=dev) * 0.01 + 1e-3).half()
        z = torch.full((n, k // g), 2 ** (bits - 1), device=dev, dtype=torch.uint8)
        layer = PackedLinear.from_quantized(q, s, z, bits, g)
        return _graph_time_us(lambda: layer(x), self.inner, self.repeats)


def rewind_static_cache(cache, position: int) -> None:
    """Make the next write into a ``transformers.StaticCache`` land at ``position``.

    Recent transformers versions place new keys by a per-layer counter on the device
    (``cumulative_length``) rather than by ``cache_position``, so a step replayed in a CUDA graph
    would walk past the end of the cache (a device-side assert in ``index_copy_``). Filling the
    counter is a device op, so it is captured with the step; on versions without a counter it is a
    no-op.
    """
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(position)


def _step_us(model: nn.Module, structure: ModelStructure, batch: int, context: int,
             new_tokens: int) -> tuple[float, str]:
    """Microseconds of one forward pass of ``new_tokens`` per sequence after ``context`` cached tokens
    (a static cache, the step captured in a CUDA graph and replayed; eager, and said so, where it
    cannot be captured). Returns (microseconds, how it was timed)."""
    from transformers import StaticCache

    dev = torch.device("cuda")
    # Every position must exist in the model, whatever the deployment asks for.
    new_tokens = max(1, min(new_tokens, structure.max_positions))
    context = max(0, min(context, structure.max_positions - new_tokens))
    cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=context + new_tokens)
    ids = torch.randint(0, structure.vocab_size, (batch, context + new_tokens), device=dev)
    with torch.no_grad():
        if context:
            model(input_ids=ids[:, :context], past_key_values=cache, cache_position=torch.arange(context, device=dev),
                  use_cache=True)
        step_ids = ids[:, context:].clone()
        positions = torch.arange(context, context + new_tokens, device=dev)

        def step():
            rewind_static_cache(cache, context)  # every replay writes the same positions
            return model(input_ids=step_ids, past_key_values=cache, cache_position=positions, use_cache=True).logits

        try:
            return _graph_time_us(step, inner=1, repeats=20), "cuda graph, static cache"
        except Exception:  # noqa: BLE001 - a model whose forward cannot be captured: eager, and said so
            torch.cuda.synchronize()
            import time

            times = []
            for _ in range(20):
                torch.cuda.synchronize()
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e6)
            return statistics.median(times), "eager (graph capture failed)"


def _remainder_us(make_model, structure: ModelStructure, timer: LayerTimer, batch: int, context: int,
                  dtype: torch.dtype, new_tokens: int = 1) -> tuple[float, str]:
    """Time outside the linears of one forward pass of ``new_tokens`` per sequence after ``context``
    cached tokens (decode: 1 token after the context; prefill: the prompt after none): the
    uncompressed model's measured pass minus its linears' measured times.

    Returns (microseconds, how it was measured).
    """
    key = (f"{timer.device_name}|{timer.build}|remainder|{structure.model_type}|{structure.n_params}|b{batch}|c{context}"
           f"|q{new_tokens}|{str(dtype).split('.')[-1]}")
    if key in timer.times:
        entry = timer.times[key]
        return entry["remainder_us"], entry["how"]
    model = make_model().to(torch.device("cuda"), dtype).eval()
    total, how = _step_us(model, structure, batch, context, new_tokens)
    del model
    rows = batch * new_tokens
    linears = sum(timer.layer_us(li.out_features, li.in_features, "dense", rows, dtype) for li in structure.linears)
    remainder = max(total - linears, 0.0)
    timer.times[key] = {"remainder_us": remainder, "how": how, "total_fp16_us": total}
    timer._save()
    return remainder, how


def _pack_rtn(model: nn.Module, names: set[str], bits: int, group_size: int) -> None:
    """Pack the linears ``names`` from their own weights (round-to-nearest, group ``group_size`` or
    the whole row): the copy then computes what the model does, so the fusions' checks judge it as
    they would the trial's model (random codes can make a model's logits noise that no check judges)."""
    from hpsearch.methods.grid import quantize_rtn
    from hpsearch.packing import pack_model

    quantized = {}
    for name in sorted(names):
        module = model.get_submodule(name)
        k = module.in_features
        quantized[name] = quantize_rtn(module.weight.data, bits, group_size if k % group_size == 0 else k, sym=False)
    pack_model(model, quantized, check=False)  # check: the weights are the originals, not the codes'


#: the bit-widths whose fused epilogues (gated MLP, rotary + cache write) run as one kernel; other
#: widths take the same steps unfused (hpsearch.kernels)
_EPILOGUE_BITS = (2, 3, 4)


def _fused_remainder(make_model, structure: ModelStructure, timer: LayerTimer, batch: int, context: int,
                     new_tokens: int, dtype: torch.dtype, linears_us) -> dict[str, Any]:
    """What a packed forward pass (``batch`` sequences of ``new_tokens`` after ``context``) spends
    outside its linears, and at one-row decode what each fused epilogue saves there, measured once
    on a packed copy of the model.

    The copy has every block linear at 4 bits (round-to-nearest from its own weights) and gets what
    :func:`hpsearch.packing.pack_model` does: siblings as one launch (plain), then, for one-row
    decode (the only steps the epilogues take), gated MLPs, then rotary and cache write in the q/k/v
    launch, one fusion at a time. ``plain_us`` is the plain pass minus its linears as the objective
    times them (``linears_us``), and ``gated_saving_us`` / ``rope_saving_us`` are per fused module:
    the step's time before the fusion minus after, over the modules the fusion took (the modules'
    names are kept: the trial's formats decide which of them fuse). Why not the dense model's
    remainder: the packed step's elementwise work is not the dense step's, and its linears' isolated
    timings relate to the pass differently; kernels/NOTES.md runs 31 and 33 measured the dense
    remainder 10-60% off packed steps (one row and 4-16 rows).
    """
    key = (f"{timer.device_name}|{timer.build}|fused-remainder@{_kernels_fingerprint()}|{structure.model_type}"
           f"|{structure.n_params}|b{batch}|c{context}|q{new_tokens}|{str(dtype).split('.')[-1]}")
    if key in timer.times:
        return timer.times[key]
    from hpsearch.kernels import fuse_gated_mlps, fuse_packed_siblings, fuse_rope_attention

    model = make_model().to(torch.device("cuda"), dtype).eval()
    blocks = {li.name for li in structure.block_linears()}
    _pack_rtn(model, blocks, bits=4, group_size=128)
    example = torch.randint(0, structure.vocab_size, (1, 4), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
    fuse_packed_siblings(model, input_ids=example)
    plain, how = _step_us(model, structure, batch, context, new_tokens)
    gated, rope, after_gated, after_rope = [], [], plain, plain
    if batch * new_tokens == 1:
        gated = fuse_gated_mlps(model, input_ids=example)
        after_gated = _step_us(model, structure, 1, context, 1)[0] if gated else plain
        rope = fuse_rope_attention(model, example)
        after_rope = _step_us(model, structure, 1, context, 1)[0] if rope else after_gated
    del model
    fmt = {li.name: (f"packed4g{128 if li.in_features % 128 == 0 else li.in_features}" if li.name in blocks
                     else "dense") for li in structure.linears}
    entry = {
        "plain_us": max(plain - linears_us(fmt), 0.0), "how": how, "plain_step_us": plain,
        "gated": gated, "gated_saving_us": (plain - after_gated) / len(gated) if gated else 0.0,
        "rope": rope, "rope_saving_us": (after_gated - after_rope) / len(rope) if rope else 0.0,
    }
    timer.times[key] = entry
    timer._save()
    return entry


def _kernels_fingerprint() -> str:
    from hpsearch.kernels import fingerprint

    return fingerprint()


def _linears_us(timer: LayerTimer, info: dict, fmt: dict[str, str], records: dict, groups: list[list[str]],
                rows: int, dtype: torch.dtype) -> tuple[float, list[list[str]]]:
    """Microseconds of a step's linears in the formats ``fmt``, and the sibling runs timed as one
    launch: packed siblings of one format (q/k/v, gate/up) run as one (hpsearch.kernels.fuse_packed_siblings)."""

    def fusable(a: str, b: str) -> bool:  # as hpsearch.kernels.can_fuse will judge the packed layers
        return (fmt[a] == fmt[b] and fmt[a].startswith("packed") and info[a].in_features == info[b].in_features
                and not records.get(a, {}).get("in_scale") and not records.get(b, {}).get("in_scale"))

    total, fused, fused_runs = 0.0, set(), []
    for group in groups:
        for run in runs([n for n in group if n in info], fusable):
            if len(run) > 1:
                first = info[run[0]]
                total += timer.layer_us(sum(info[n].out_features for n in run), first.in_features, fmt[first.name],
                                        rows, dtype)
                fused.update(run)
                fused_runs.append(run)
    for name, li in info.items():
        if name not in fused:
            total += timer.layer_us(li.out_features, li.in_features, fmt[name], rows, dtype)
    return total, fused_runs


class MeasuredLatency(Objective):
    """Decode latency per token (or prefill time) in milliseconds, measured on the GPU.

    Without CUDA the value is the roofline model's, labelled so. ``batch_size`` and ``context`` may
    be lists: the value is then the mean over their grid (each point is also reported in
    ``latency_grid_ms``), for deployments that serve several shapes.

    Args:
        batch_size, context: deployment shape(s) (sequences per step, tokens already in the cache).
        phase: ``"decode"`` (one new token per sequence, the default) or ``"prefill"`` (a prompt of
            ``prefill_tokens`` tokens per sequence, with an empty cache).
        prefill_tokens: prompt length for the prefill time; with ``phase: decode`` and a positive
            value, the prefill time of the first batch size is measured too and reported as
            ``prefill_ms``.
        profile: roofline device profile used without CUDA, and reported beside the measurement.
        dtype_bytes: bytes per element of what stays uncompressed (for the roofline).
        cache_file: JSON file of layer timings (default ``$HPSEARCH_CACHE`` or ``~/.cache/hpsearch``).
        inner, repeats: calls per CUDA graph and graph replays per timing.
    """

    PHASES = ("decode", "prefill")

    def __init__(self, *, name: str = "latency_ms", direction: str = "minimize", batch_size: int | list[int] = 1,
                 context: int | list[int] = 1024, phase: str = "decode", prefill_tokens: int = 0,
                 profile: str = "h100", dtype_bytes: int = 2, cache_file: str | None = None,
                 inner: int = 20, repeats: int = 15) -> None:
        super().__init__(name=name, direction=direction)
        from hpsearch.errors import ConfigError

        self.batch_sizes = _positive_ints(batch_size, "batch_size", allow_zero=False)
        self.contexts = _positive_ints(context, "context", allow_zero=True)
        if phase not in self.PHASES:
            raise ConfigError("phase", f"got {phase!r}; allowed: {', '.join(self.PHASES)}")
        if phase == "prefill" and prefill_tokens <= 0:
            raise ConfigError("prefill_tokens", "must be a positive prompt length when phase is 'prefill'")
        if prefill_tokens < 0:
            raise ConfigError("prefill_tokens", f"got {prefill_tokens}; allowed: 0 (off) or a prompt length")
        self.phase, self.prefill_tokens, self.dtype_bytes = phase, prefill_tokens, dtype_bytes
        self.profile = get_profile(profile)
        from hpsearch.kernels import _few_rows

        _few_rows.enabled()  # a bad HPSEARCH_FEW_ROWS is refused here, before the study starts
        root = Path(os.environ.get("HPSEARCH_CACHE", Path.home() / ".cache" / "hpsearch"))
        self.cache_file = Path(cache_file) if cache_file else root / "latency.json"
        self.inner, self.repeats = inner, repeats
        self._timer: LayerTimer | None = None
        self._siblings: list[list[str]] | None = None  # linears handed one input (q/k/v, gate/up)
        self._fused_failure = ""  # why a packed copy's rest could not be timed, once it could not

    def _roofline_ms(self, ctx: EvalContext, batch: int, context: int, new_tokens: int) -> float:
        if new_tokens > 1:
            return prefill_seconds(ctx.structure, ctx.manifest, self.profile, batch, new_tokens, self.dtype_bytes) * 1e3
        return decode_seconds(ctx.structure, ctx.manifest, self.profile, batch, context, self.dtype_bytes) * 1e3

    def _points(self) -> list[tuple[int, int, int]]:
        """(batch, context, new tokens) of every timed forward pass the value averages."""
        if self.phase == "prefill":
            return [(b, 0, self.prefill_tokens) for b in self.batch_sizes]
        return [(b, c, 1) for b in self.batch_sizes for c in self.contexts]

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> float:
        points = self._points()
        roofline = [self._roofline_ms(ctx, *pt) for pt in points]
        roofline_ms = statistics.fmean(roofline)
        if not torch.cuda.is_available():
            ctx.attrs.update(latency_source=f"roofline:{self.profile.name} (no CUDA device to measure on)")
            if len(points) > 1:
                ctx.attrs["latency_grid_ms"] = {_label(*pt): r for pt, r in zip(points, roofline)}
            return roofline_ms
        if self._timer is None:
            self._timer = LayerTimer(self.cache_file, self.inner, self.repeats)
        measured, parts = [], {}
        for pt in points:
            ms, linears, remainder, how = self._measure_ms(ctx, model, *pt)
            measured.append(ms)
            parts[_label(*pt)] = ms
        measured_ms = statistics.fmean(measured)
        ctx.attrs.update(latency_source=f"measured:{self._timer.device_name} (per-layer CUDA graphs; rest: {how})",
                         latency_roofline_ms=roofline_ms, latency_linears_ms=linears / 1e3,
                         latency_remainder_ms=remainder / 1e3, latency_phase=self.phase,
                         roofline_error=(roofline_ms - measured_ms) / measured_ms)
        if len(points) > 1:
            ctx.attrs["latency_grid_ms"] = parts
        if self.phase == "decode" and self.prefill_tokens > 0:
            ctx.attrs["prefill_ms"] = self._measure_ms(ctx, model, self.batch_sizes[0], 0, self.prefill_tokens)[0]
        return measured_ms

    def _measure_ms(self, ctx: EvalContext, model: nn.Module, batch: int, context: int,
                    new_tokens: int) -> tuple[float, float, float, str]:
        """(milliseconds, linears us, remainder us, how the rest was timed) of one forward pass."""
        timer, dtype = self._timer, torch.float16
        base = ctx.source_model if ctx.source_model is not None else model  # the uncompressed model
        rows = batch * new_tokens
        info = {li.name: li for li in ctx.structure.linears}
        records = ctx.manifest.layers
        fmt = {name: layer_format(records[name]) for name in info}
        groups = self._sibling_groups(base, ctx.structure.vocab_size)
        linears, runs = _linears_us(timer, info, fmt, records, groups, rows, dtype)
        entry, failure = None, self._fused_failure
        if not failure and any(f.startswith("packed") for f in fmt.values()):
            # a packed pass: its rest measured on a packed copy, less what this trial's fused epilogues
            # save at one-row decode (a gated MLP's or an attention's sibling run at 2-4 bits, as
            # pack_model fuses)
            try:
                entry = _fused_remainder(lambda: copy.deepcopy(base), ctx.structure, timer, batch, context,
                                         new_tokens, dtype,
                                         lambda f: _linears_us(timer, info, f, {}, groups, rows, dtype)[0])
            except Exception as exc:  # noqa: BLE001 - the float16 model's rest, and said so (once a study)
                failure = self._fused_failure = \
                    f" (a packed copy could not be timed: {type(exc).__name__}: {str(exc)[:120]})"
        if entry is not None:
            gated, rope = set(entry["gated"]), set(entry["rope"])
            remainder, fused = entry["plain_us"], {"gated": 0, "rope": 0}
            for run in runs:
                parent = run[0].rpartition(".")[0]
                tails = sorted(name.rpartition(".")[2] for name in run)
                bits = int(fmt[run[0]][len("packed"):].split("g")[0])
                if rows > 1 or bits not in _EPILOGUE_BITS or any(n.rpartition(".")[0] != parent for n in run):
                    continue
                if parent in gated and tails == ["gate_proj", "up_proj"]:
                    remainder -= entry["gated_saving_us"]
                    fused["gated"] += 1
                elif parent in rope and tails == ["k_proj", "q_proj", "v_proj"]:
                    remainder -= entry["rope_saving_us"]
                    fused["rope"] += 1
            remainder = max(remainder, 0.0)
            how = (f"{entry['how']}; rest measured on a 4-bit packed copy, fused epilogues of this trial: "
                   f"{fused['gated']} gated MLPs, {fused['rope']} rotary/cache q/k/v")
        else:
            remainder, how = _remainder_us(lambda: copy.deepcopy(base), ctx.structure, timer, batch, context, dtype,
                                           new_tokens)
            how += failure
        return (remainder + linears) / 1e3, linears, remainder, how

    def _sibling_groups(self, base: nn.Module, vocab_size: int) -> list[list[str]]:
        """The linears of ``base`` that one forward pass hands the same input (found once)."""
        if self._siblings is None:
            from hpsearch.kernels._siblings import shared_input_groups

            ids = torch.randint(0, vocab_size, (1, 4), device=next(base.parameters()).device)
            try:
                self._siblings = [g for g in shared_input_groups(base, nn.Linear, input_ids=ids) if len(g) > 1]
            except Exception:  # noqa: BLE001 - a forward that needs more than ids: time every layer alone
                self._siblings = []
        return self._siblings


def _label(batch: int, context: int, new_tokens: int) -> str:
    return f"prefill b{batch} p{new_tokens}" if new_tokens > 1 else f"decode b{batch} c{context}"


def _positive_ints(value, key: str, allow_zero: bool) -> list[int]:
    """``value`` (an int or a list of ints) as a list, or a one-line ``ConfigError`` naming ``key``."""
    from hpsearch.errors import ConfigError

    values = [value] if isinstance(value, (int, str)) else list(value)
    lowest = 0 if allow_zero else 1
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < lowest for v in values):
        raise ConfigError(key, f"got {value!r}; allowed: an integer >= {lowest} or a list of them")
    return [int(v) for v in values]
