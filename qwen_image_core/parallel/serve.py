"""A sequence-parallel worker process, started by `workers.Workers` as

    python -c "from qwen_image_core.parallel.serve import main; main()" FD RANK

with the package folder on PYTHONPATH and FD its end of a socket pair to the controller. It reads its
configuration, joins the group, loads the DiT once, then runs jobs until told to stop or the controller is gone.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from .group import GroupSpec, agree, join
from .ulysses import SequenceParallel
from .wire import decode, encode, recv, resolve, send


class Interrupted(Exception):
    """Raised on every rank when the controller asked the running job to stop."""


@dataclass
class Context:
    """What a job gets on its rank."""

    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # this rank's DiT
    forward: SequenceParallel  # the DiT's forward with the sequence split over the ranks
    conn: Connection  # to the controller
    streamer: object = None  # the offload executor (offload.BlockStreamer) when the DiT streams, else None
    stopped: bool = False  # the controller's "stop" arrived during this job

    def stop_requested(self) -> bool:
        """Whether the controller asked to stop; the same answer on every rank (call it on all, at the same point)."""
        while not self.stopped and self.conn.poll():  # during a job the controller only ever sends "stop"
            msg = recv(self.conn)
            if msg != "stop":
                raise RuntimeError(f"sequence-parallel worker: {type(msg).__name__} from the controller during a job")
            self.stopped = True
        return agree(self.stopped, self.device)

    def progress(self, step: int, steps: int) -> None:
        """Rank 0 reports a finished step to the controller's `on_progress(step, steps)`."""
        if self.rank == 0:
            send(self.conn, ("progress", None, (step, steps)))


def _start(conn: Connection, rank: int) -> Context:
    config = recv(conn)
    sys.path[:0] = config["paths"]
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    spec = GroupSpec(tuple(config["devices"]), config["store"], config["timeout_s"])
    device = join(spec, rank)
    from ..mmdit import load_dit  # noqa: PLC0415 (after the group: a bad device fails before minutes of loading)

    model = load_dit(config["dit"], **config["options"])
    if config["budget"] is None:
        return Context(rank, spec.world, device, model.to(device), SequenceParallel(model), conn)
    return Context(rank, spec.world, device, model, SequenceParallel(model), conn, _stream(model, device, config))


def _stream(model, device: torch.device, config: dict):
    """The DiT placed within `config["budget"]` device bytes: resident blocks and streamed ones (offload.py)."""
    from ..offload import BlockStreamer, default_transfer  # noqa: PLC0415
    from ..offload_plan import CARDS, plan_blocks, split_blocks, storage_label  # noqa: PLC0415

    sizes, fixed = split_blocks(model, model.transformer_blocks)
    card = CARDS["24GB"]  # the time model only orders equal-fit candidates; the budget decides what fits
    plan = plan_blocks(sizes, fixed, config["budget"], 0, 0, 1.0, card.h2d_gbps * 1e9, f"rank on {device}",
                       storage_label(model.transformer_blocks))  # fmt: skip
    return BlockStreamer(model, model.transformer_blocks, plan, default_transfer(device)).attach()


def main() -> None:
    fd, rank = int(sys.argv[1]), int(sys.argv[2])
    conn = Connection(fd)
    try:
        ctx = _start(conn, rank)
    except BaseException:  # noqa: BLE001 (reported to the controller, which raises it)
        send(conn, ("error", None, traceback.format_exc()))
        return
    send(conn, ("ready", None, None))
    while True:
        try:
            msg = recv(conn)
        except (EOFError, OSError):  # the controller is gone
            break
        if msg is None:
            break
        if msg == "stop":  # for a job that ended before it arrived
            continue
        job, ref, args, kwargs = msg
        ctx.stopped = False
        try:
            result = resolve(ref)(ctx, *decode(args), **decode(kwargs))
            send(conn, ("done", job, encode(result) if rank == 0 else None))
        except Interrupted:
            send(conn, ("interrupted", job, None))
        except BaseException:  # noqa: BLE001
            send(conn, ("error", job, traceback.format_exc()))
    dist.destroy_process_group()
