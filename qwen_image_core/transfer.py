"""The device seam of the offload executor: host buffers, device buffers and ordered copies between them.

`Transfer` is the CPU implementation (the "device" is host memory, copies are plain `copy_`), with the
accounting (device bytes held, peak) that CPU tests assert; `CudaTransfer` is the same contract on a GPU:
pinned host memory, a dedicated copy stream and CUDA events. offload.py explains the ordering it provides.
"""

from __future__ import annotations

import torch


class Transfer:
    """Host buffers, device buffers and ordered copies between them; counts the device bytes it holds.

    This base class is the CPU implementation: the "device" is host memory, copies are plain
    `copy_`, events are None. It remembers its allocations so tests can check where tensors live.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.allocated = 0  # device bytes held now
        self.peak = 0  # the most ever held at once
        self._regions: dict[int, tuple[int, int]] = {}  # id(tensor) -> (data_ptr, nbytes) of live allocations

    def _account(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        self._regions[id(t)] = (t.data_ptr(), nbytes)
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        return t

    def free(self, t: torch.Tensor) -> None:
        """Forget a tensor returned by `device_buffer`/`to_device` (the caller drops its references)."""
        self.allocated -= self._regions.pop(id(t))[1]

    def on_device(self, t: torch.Tensor) -> bool:
        """Whether t's memory lies in a live device allocation of this Transfer."""
        p = t.data_ptr()
        return any(start <= p < start + n for start, n in self._regions.values())

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def free_host(self, buffers: list[torch.Tensor]) -> None:
        """Forget host buffers made by `host_buffer` (their pinned bytes go back to the budget)."""

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return self._account(torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A resident copy of t on the device (placed once, at attach)."""
        return self._account(t.to(self.device, copy=True))

    def activation(self, t: torch.Tensor) -> torch.Tensor:
        """A copy on this device of an activation computed on another one (the block boundaries of a model spread
        over several devices, `multi_device.py`); not counted as held: it lives as long as the pass uses it."""
        return t.to(self.device, copy=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after):
        """dst <- src once `after` (a `release` marker) has passed; returns a marker for `wait`."""
        dst.copy_(src)

    def wait(self, marker) -> None:
        """Make the compute that follows wait for a `copy`."""

    def release(self):
        """A marker after all compute issued so far."""

    def synchronize(self) -> None:
        """Wait for every copy and compute issued so far."""

    def empty_cache(self) -> None:
        """Return cached free device memory (before re-planning)."""

    def release_host(self) -> None:
        """Return cached free pinned host memory to the system."""

    def free_memory(self) -> int | None:
        """Free device bytes as the driver reports them; None on CPU (the caller gives a budget)."""
        return None


class CudaTransfer(Transfer):
    """Pinned host memory, a dedicated copy stream, CUDA events between it and the compute stream."""

    def __init__(self, device: torch.device | str = "cuda", max_pinned: int | None = None):
        super().__init__(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.pins = PinBudget(max_pinned)  # host RAM cap for page-locked memory (None: no cap)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Pinned while under the budget; beyond it, or if the driver refuses to pin, pageable (its copies then
        block the CPU, still correct)."""
        return self.pins.allocate(nbytes)

    def free_host(self, buffers: list[torch.Tensor]) -> None:
        self.pins.release(buffers)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        t = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # allocated on the compute stream
        t.record_stream(self.stream)  # also written by the copy stream: its free waits for those copies
        return self._account(t)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None) -> torch.cuda.Event:
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)  # the slot's previous block has finished reading it
            dst.copy_(src, non_blocking=True)  # pinned -> device, asynchronous on the copy stream
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, marker: torch.cuda.Event | None) -> None:
        if marker is not None:
            torch.cuda.current_stream(self.device).wait_event(marker)

    def release(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def synchronize(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def empty_cache(self) -> None:
        self.synchronize()
        torch.cuda.empty_cache()

    def release_host(self) -> None:
        """Return PyTorch's cached free pinned memory to the system (its host allocator keeps it otherwise)."""
        if not torch.cuda.is_initialized():
            return
        accelerator = getattr(torch, "accelerator", None)
        if hasattr(accelerator, "empty_host_cache"):  # PyTorch releases of 2026
            accelerator.empty_host_cache()
        elif hasattr(torch._C, "_host_emptyCache"):  # PyTorch >= 2.5
            torch._C._host_emptyCache()

    def free_memory(self) -> int:
        """Driver-free bytes plus what PyTorch's caching allocator holds unused."""
        free = torch.cuda.mem_get_info(self.device)[0]
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def default_transfer(device: torch.device | str, max_pinned: int | None = None) -> Transfer:
    device = torch.device(device)
    return CudaTransfer(device, max_pinned) if device.type == "cuda" else Transfer(device)


class PinBudget:
    """Page-locked host memory within a cap: buffers are pinned while they fit (and while the driver agrees),
    else pageable. Released buffers give their bytes back. `pin` makes the buffer (swapped in CPU tests)."""

    def __init__(self, max_bytes: int | None, pin=None):
        self.max_bytes, self.used, self.refused = max_bytes, 0, 0
        self._pinned: dict[int, int] = {}  # id(buffer) -> bytes counted
        self._pin = pin or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))

    def allocate(self, nbytes: int) -> torch.Tensor:
        if self.max_bytes is None or self.used + nbytes <= self.max_bytes:
            try:
                buf = self._pin(nbytes)
            except RuntimeError:  # the driver refuses (e.g. Windows' locked-memory limit): pageable instead
                self.refused += 1
            else:
                self._pinned[id(buf)] = nbytes
                self.used += nbytes
                return buf
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            self.used -= self._pinned.pop(id(buf), 0)


def measure_h2d_gbps(device: torch.device | str, nbytes: int = 256 << 20) -> float:
    """Pinned host-to-device bandwidth in GB/s, measured with one copy of `nbytes` (timed with CUDA events)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes / (start.elapsed_time(end) / 1e3) / 1e9
