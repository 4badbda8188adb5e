"""The torch.distributed group of the sequence-parallel workers: one rank per device, gloo on CPU, NCCL on GPUs.

Rendezvous is a FileStore (a file the controller names; no TCP port to pick). Every collective has the
group's timeout, so a rank whose peer stopped answering raises instead of waiting forever.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GroupSpec:
    """What a worker needs to join the group."""

    devices: tuple[str, ...]  # device of each rank, e.g. ("cuda:0", "cuda:1") or ("cpu", "cpu")
    store: str  # path of the rendezvous file (must not exist yet; one per group)
    timeout_s: float = 120.0  # any collective waiting longer raises (a dead or stuck peer)

    @property
    def world(self) -> int:
        return len(self.devices)

    def backend(self) -> str:
        """NCCL when the ranks are CUDA devices, else gloo (CPU); mixed kinds are refused."""
        kinds = {torch.device(d).type for d in self.devices}
        if kinds == {"cuda"}:
            return "nccl"
        if kinds == {"cpu"}:
            return "gloo"
        raise ValueError(f"sequence parallel: ranks on {sorted(kinds)} devices; use all CUDA or all CPU")


def check_devices(devices: tuple[str, ...]) -> None:
    """A clear error, before any process starts, when fewer CUDA devices exist than asked for (or one repeats)."""
    if len(devices) < 2:
        raise ValueError(f"sequence parallel needs at least 2 devices, got {list(devices)}")
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = [d.index if d.index is not None else 0 for d in cuda]
        if len(set(index)) != len(index):
            raise ValueError(f"sequence parallel: a GPU is listed twice in {list(devices)} (one rank per GPU)")
        if max(index) >= have:
            raise ValueError(f"sequence parallel: asked for {list(devices)} but this machine has {have} CUDA device(s)")


def join(spec: GroupSpec, rank: int) -> torch.device:
    """Join the group as `rank`; returns the rank's device (the current CUDA device for NCCL)."""
    device = torch.device(spec.devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        spec.backend(),
        init_method=f"file://{spec.store}",
        rank=rank,
        world_size=spec.world,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )
    return device


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is True (one tiny all-reduce): ranks stop at the same step."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
