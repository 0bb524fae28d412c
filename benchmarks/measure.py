"""How the benchmarks measure: interleaved wall-clock repetitions and peak live tensor memory.

Timing: the functions under comparison run in turn, rep after rep, so a load change on a shared
machine hits all of them alike; each rep starts one function later (A B C, B C A, C A B, ...),
so none always runs first or always after the same other; we keep per-rep times and report
medians and the median of the per-rep ratios.

On an accelerator each call is followed by a device synchronisation (`sync`), so a rep's time is
the work's, not the launches'. Memory there is the allocator's peak above what was allocated
before the step (`torch.cuda.max_memory_allocated`).

Memory on CPU: `PeakTensorMemory` counts the bytes of every tensor storage created by an ATen
operation while it is active (activations, gradients, temporaries, autograd's saved tensors), and
releases them when the storage is freed. Its peak is the most such memory alive at once. Storages
that existed before (weights, optimizer state after the first step) are not counted. Process RSS
and `tracemalloc` are unusable for this: RSS keeps freed pages and counts the torch libraries, and
`tracemalloc` does not see torch's allocator.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (does nothing on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "cpu":
        return lambda: None
    raise ValueError(f"the benchmarks run on cpu or cuda, not {device.type}.")


def interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
):
    """{name: [seconds per rep]} for functions timed in turn, after `warmup` untimed rounds;
    `sync` waits for an accelerator before each clock reading."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over reps of num[i] / den[i]: the two were measured next to each other."""
    return statistics.median(a / b for a, b in zip(num, den))


class PeakTensorMemory(TorchDispatchMode):
    """Within `with PeakTensorMemory() as m:`, m.peak is the most bytes of new CPU tensor storage
    alive at once, and m.live the bytes still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }  # views and in-place results share an input's storage: nothing new
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def peak_memory(step: Callable[[], object], warmup: int = 1, device="cpu") -> int:
    """Peak bytes of new tensor memory during one call of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu or cuda, not {device.type}.")
    with PeakTensorMemory() as m:
        step()
    return m.peak
