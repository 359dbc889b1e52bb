"""Peak memory of one training step, measured with torch's own allocator statistics.

A contender's figure is everything it holds at its peak: its own copy of the model, the optimizer
state, the gradients kept between steps, and the step's transient tensors (activations, w + e,
temporaries):

    footprint = max over one step of allocated bytes - allocated bytes before the contender was built

(the third step after building it: the state exists; a first instance built and dropped before it
has compiled the step, so compilation's own leftovers are not counted). On CUDA it
comes from the caching allocator's counters (``torch.cuda.memory_allocated``,
``torch.cuda.reset_peak_memory_stats``, ``torch.cuda.max_memory_allocated``). The CPU allocator
keeps no peak, so there it comes from the profiler's memory accounting
(``torch.profiler.profile(profile_memory=True)``, torch 2.14): every allocation and free while
profiling is an event carrying the allocator's running total. The profiler only knows the sizes
of blocks allocated while it runs, so the profile spans the contender's building and warm-up too.

Reported in parameter-sized copies over the SGD step: (footprint - SGD's footprint) / bytes of the
parameters. SAM must hold one copy more than SGD, the saved w (in the pure step, w + e beside w);
every further copy is overhead.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

MEASURED = "bench.memory: measured step"
WARMUP_STEPS = 2  # the optimizer state exists after one step; a compiled step is compiled in the first


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters: the unit of the copies reported."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def footprint_cuda(make_step: Callable[[], Callable[[], object]]) -> tuple[int, str]:
    """Peak CUDA bytes of a step built by ``make_step()`` (its model copy, optimizer state and the
    gradients it keeps included), from the caching allocator's counters."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    step = make_step()
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start, "(CUDA: not recorded)"


def _allocations(events) -> tuple[list[tuple[int, int, int, str]], tuple[int, int]]:
    """(time ns, bytes allocated (negative: freed), allocator total after it, the ops around it) of
    every CPU allocation event in the profiler's event tree, and the measured step's (start, end) in ns."""
    found, span = [], []
    stack = list(events)
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            if fields.device.type == "cpu":
                found.append((event.start_time_ns, fields.alloc_size, fields.total_allocated, _op_path(event)))
        elif event.name == MEASURED:
            span.append((event.start_time_ns, event.end_time_ns))
        stack.extend(event.children)
    if len(span) != 1:
        raise RuntimeError(f"expected one '{MEASURED}' range in the profile, found {len(span)}")
    return sorted(found), span[0]


def _op_path(event) -> str:
    """The ops around an allocation, innermost first (``aten::empty <- aten::convolution_backward``), up to three."""
    names, parent = [], event.parent
    while parent is not None and len(names) < 3:
        names.append(parent.name)
        parent = parent.parent
    return " <- ".join(names) or "?"


def footprint_cpu(make_step: Callable[[], Callable[[], object]]) -> tuple[int, str]:
    """Peak CPU bytes of a step built by ``make_step()``, from the profiler's allocation events: the
    profile spans the building and the warm-up steps, so every block the step holds or frees was
    allocated under it and is counted. Also returns the ops whose allocation reached the peak."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = make_step()
        for _ in range(WARMUP_STEPS):
            step()
        with record_function(MEASURED):
            step()
    events, (begin, end) = _allocations(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return 0, "no allocation"
    start = events[0][2] - events[0][1]  # the allocator's running total when the profile began
    inside = [(total, op) for t, _, total, op in events if begin <= t <= end]
    peak, op = max(inside, default=(start, "no allocation"), key=lambda event: event[0])
    return peak - start, op


def compile_first(make_step: Callable[[], Callable[[], object]]) -> None:
    """Build a step and take its warm-up steps, then drop it: a compiled step is then compiled and
    cached before the measured one is built, so what compilation leaves allocated is not counted."""
    step = make_step()
    for _ in range(WARMUP_STEPS):
        step()
    del step
    gc.collect()


def footprint(make_step: Callable[[], Callable[[], object]], device: str) -> tuple[int, str]:
    """Peak bytes during one step, counted from before ``make_step()`` built it, on ``device``
    ("cpu" or "cuda"), and where the peak was reached (the ops, on the CPU). A first instance is
    built and dropped before (:func:`compile_first`)."""
    compile_first(make_step)
    if torch.device(device).type == "cuda":
        return footprint_cuda(make_step)
    return footprint_cpu(make_step)


def copies_over(makers: dict[str, Callable[[], Callable[[], object]]], baseline: str | Callable[[str], str],
                param_bytes: int, device: str) -> dict[str, dict]:
    """Per step: its peak in MiB, in parameter copies, in parameter copies over its baseline's (the SGD
    step: ``baseline``, or ``baseline(name)`` to pair each step with its own), and where it peaked;
    each step is built, warmed up and measured alone, in turn."""
    peaks = {name: footprint(make, device) for name, make in makers.items()}
    baseline_of = baseline if callable(baseline) else (lambda name: baseline)
    return {name: dict(peak_mib=peak / 2**20, copies=peak / param_bytes, baseline=baseline_of(name),
                       copies_over_sgd=(peak - peaks[baseline_of(name)][0]) / param_bytes, peak_at=op)
            for name, (peak, op) in peaks.items()}
