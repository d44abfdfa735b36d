"""The peak of live tensor memory over a piece of CPU work: the CPU analogue of ``torch.cuda.max_memory_allocated``.

A process's RSS also counts the allocator's cache, fragmentation and the libraries, so it compares methods only
roughly; the GPU figure that SparseGrad's memory target is about is the caching allocator's peak of live tensor
bytes. On the CPU, torch's profiler with ``profile_memory=True`` reports every tensor allocation and free
(including the temporaries inside C++ operators) with the running total of what it saw allocated. That total
starts at zero when profiling starts, and frees of tensors allocated before are not subtracted, so:

    peak = (live tensor bytes at the start of the measured work, counted by walking the given tensors)
           + max(running total during the work) - (running total at its start)

where the work runs after a warm-up under the same profiler, so that every tensor it frees was allocated under
the profiler (a training step's optimizer state, for instance, is replaced by the step before). The tensors
alive at the start are counted once per storage: parameters, buffers, gradients, optimizer state and whatever
else is passed in (the batch).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Iterable

import torch


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse:
            yield obj._indices()
            yield obj._values()
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def live_tensor_bytes(*objs: Any, model: torch.nn.Module | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages of the given tensors (nested in dicts/lists), of ``model``'s parameters,
    buffers and gradients and of ``optimizer``'s state."""
    found: list[Any] = list(objs)
    if model is not None:
        found += [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
        found += list(model.buffers())
    if optimizer is not None:
        found += list(optimizer.state.values())
    seen: dict[int, int] = {}
    for t in _tensors(found):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def peak_tensor_bytes(work: Callable[[], None], warmup: Callable[[], None], live_at_start: Callable[[], int]) -> int:
    """Peak live tensor bytes during ``work()`` on the CPU (module docstring): ``warmup()`` then ``work()`` run under
    one memory-profiling session; ``live_at_start()`` counts the live tensors between them."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        base = live_at_start()
        with record_function("scalerec::measured_work"):
            work()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    marks = [e for e in events if e.get("name") == "scalerec::measured_work" and e.get("ph") == "X"]
    if not marks:
        raise RuntimeError("peak_tensor_bytes: the profiler recorded no measured work")
    t0, t1 = marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                 if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    before = [tot for ts, tot in mem if ts < t0]
    during = [tot for ts, tot in mem if t0 <= ts <= t1]
    start = before[-1] if before else 0
    return base + max([start] + during) - start
