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

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return self._account(torch.empty(nbytes, dtype=torch.uint8, device=self.device))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A resident copy of t on the device (placed once, at attach)."""
        return self._account(t.to(self.device, copy=True))

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
        self.max_pinned, self.pinned = max_pinned, 0  # host RAM cap for page-locked memory (None: no cap)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Pinned while under `max_pinned`; beyond it pageable (its copies then block the CPU, still correct)."""
        pin = self.max_pinned is None or self.pinned + nbytes <= self.max_pinned
        self.pinned += nbytes if pin else 0
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

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
        accelerator = getattr(torch, "accelerator", None)  # PyTorch >= 2.8 (older ones keep it cached)
        if torch.cuda.is_initialized() and hasattr(accelerator, "empty_host_cache"):
            accelerator.empty_host_cache()

    def free_memory(self) -> int:
        """Driver-free bytes plus what PyTorch's caching allocator holds unused."""
        free = torch.cuda.mem_get_info(self.device)[0]
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def default_transfer(device: torch.device | str) -> Transfer:
    device = torch.device(device)
    return CudaTransfer(device) if device.type == "cuda" else Transfer(device)
