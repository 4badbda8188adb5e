"""Sequence-parallel worker processes: started once, each loading the DiT once, serving jobs until stopped.

    workers = Workers(DitFile("qwen_image_bf16.safetensors"), ["cuda:0", "cuda:1"])
    latents = workers.run(jobs.sample, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0)
    workers.stop()

The controller (this process, e.g. ComfyUI's) is not a rank: it spawns one process per device, which join
one torch.distributed group (`group.py`) and wait for jobs. A job is a picklable function run on every rank
as `fn(context, *args, **kwargs)`; rank 0's return value is the result. Failures never hang the caller:

* an exception on any rank is raised here as `WorkerError` with that rank's traceback; the workers are then
  stopped (a rank may be left inside a collective) and the next `run` starts them again;
* a worker that dies (killed, out of memory) is seen by the watchdog within `poll_s` and raised as
  `WorkerDied`, the others stopped; peers blocked in a collective also give up after the group's timeout;
* `check_interrupt` (e.g. ComfyUI's interrupt check, which raises) is polled while a job runs; when it
  raises, every rank stops at the same step (`Context.stop_requested`) and its exception is re-raised here,
  the workers staying up;
* workers exit when the controller process is gone, and `stop()` (also run at interpreter exit) ends them.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from .group import GroupSpec, agree, check_devices, join
from .ulysses import SequenceParallel


class WorkerError(RuntimeError):
    """A job raised on a worker; the message carries the rank and its traceback."""


class WorkerDied(RuntimeError):
    """A worker process ended while the controller waited on it."""


class Interrupted(Exception):
    """Raised on every rank when the controller asked the running job to stop."""


@dataclass(frozen=True)
class DitFile:
    """Loads a DiT file (`mmdit.load_dit`, keyword `options` as pairs) onto the worker's device, once."""

    path: str
    options: tuple[tuple[str, object], ...] = ()

    def __call__(self, device: torch.device):
        from ..mmdit import load_dit  # noqa: PLC0415 (only in the worker)

        return load_dit(self.path, **dict(self.options)).to(device)


@dataclass
class Context:
    """What a job gets on its rank."""

    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # this rank's DiT
    forward: SequenceParallel  # the DiT's forward with the sequence split over the ranks
    _stop: object  # multiprocessing Event set by the controller
    _outbox: object  # queue to the controller

    def stop_requested(self) -> bool:
        """Whether the controller asked to stop; the same answer on every rank (call it on all, at the same point)."""
        return agree(self._stop.is_set(), self.device)

    def progress(self, step: int, steps: int) -> None:
        """Rank 0 reports a finished step to the controller's `on_progress(step, steps)`."""
        if self.rank == 0:
            self._outbox.put((0, "progress", None, (step, steps)))


def _serve(rank, spec, load, threads, inbox, outbox, stop, parent):
    """A worker's life: join the group, load the model, run jobs until told to stop or the controller is gone."""
    try:
        if threads:
            torch.set_num_threads(threads)
        device = join(spec, rank)
        model = load(device)
        ctx = Context(rank, spec.world, device, model, SequenceParallel(model), stop, outbox)
    except BaseException:  # noqa: BLE001 (reported to the controller, which raises it)
        outbox.put((rank, "error", None, traceback.format_exc()))
        return
    outbox.put((rank, "ready", None, None))
    while True:
        try:
            msg = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the controller died without stopping us
                break
            continue
        if msg is None:
            break
        job, fn, args, kwargs = msg
        try:
            result = fn(ctx, *args, **kwargs)
            outbox.put((rank, "done", job, result if rank == 0 else None))
        except Interrupted:
            outbox.put((rank, "interrupted", job, None))
        except BaseException:  # noqa: BLE001
            outbox.put((rank, "error", job, traceback.format_exc()))
    dist.destroy_process_group()


def _shutdown(procs, inboxes, folder, grace_s: float = 5.0) -> None:
    """Ask every worker to exit, then end those that do not (also run at interpreter exit)."""
    for q in inboxes:
        try:
            q.put(None)
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(grace_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(grace_s)
    for q in inboxes:
        q.close()
    shutil.rmtree(folder, ignore_errors=True)


class Workers:
    """One process per device holding the DiT from `load` (a picklable `load(device) -> model`, e.g. DitFile)."""

    def __init__(
        self,
        load: Callable,
        devices: Sequence[str],
        *,
        timeout_s: float = 120.0,  # collectives waiting longer raise on the workers
        start_timeout_s: float = 900.0,  # starting and loading the weights (a 41 GB file takes minutes)
        poll_s: float = 0.2,  # how often the watchdog looks at the processes and the interrupt check
        threads: int = 0,  # intra-op threads per worker (0: PyTorch's default)
        start_method: str = "spawn",  # spawn: safe with CUDA initialised in the controller
    ):
        self.devices = tuple(str(d) for d in devices)
        check_devices(self.devices)
        self.load, self.timeout_s, self.start_timeout_s, self.poll_s = load, timeout_s, start_timeout_s, poll_s
        self.threads, self.start_method = threads, start_method
        self._procs, self._job, self._finalizer = [], 0, None

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Start the workers and wait until every rank holds its model (no-op when they are up)."""
        if self.alive:
            return
        self.stop()
        mp = tmp.get_context(self.start_method)
        folder = tempfile.mkdtemp(prefix="qwenpix-sp-")
        spec = GroupSpec(self.devices, os.path.join(folder, "store"), self.timeout_s)
        self._outbox, self._stop = mp.Queue(), mp.Event()
        self._inboxes = [mp.Queue() for _ in self.devices]
        args = (spec, self.load, self.threads)
        self._procs = [
            mp.Process(
                target=_serve,
                args=(r, *args, self._inboxes[r], self._outbox, self._stop, os.getpid()),
                name=f"qwenpix-sp-rank{r}",
                daemon=True,
            )  # fmt: skip
            for r in range(spec.world)
        ]
        for p in self._procs:
            p.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._inboxes, folder)
        self._collect(None, "start", self.start_timeout_s)

    def run(
        self,
        fn: Callable,
        *args,
        check_interrupt: Callable[[], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        **kwargs,
    ):
        """Run `fn(context, *args, **kwargs)` on every rank; returns rank 0's result (see the module notes)."""
        self.start()
        self._job += 1
        self._stop.clear()
        for q in self._inboxes:
            q.put((self._job, fn, args, kwargs))
        return self._collect(self._job, getattr(fn, "__name__", "job"), None, check_interrupt, on_progress)

    def stop(self, grace_s: float = 5.0) -> None:
        """End the workers (idempotent): each is asked to exit, and killed after `grace_s`."""
        held = self._finalizer.detach() if self._finalizer is not None else None
        if held is not None:
            _shutdown(*held[2], grace_s=grace_s)
        self._procs, self._finalizer = [], None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _collect(self, job, what, timeout_s=None, check_interrupt=None, on_progress=None):
        """Wait for every rank's reply to `job` (None: the start), watching the processes and the interrupt
        check between messages (at least every `poll_s`)."""
        replies, interrupt, start = {}, None, time.monotonic()
        while len(replies) < len(self._procs):
            try:
                msg = self._outbox.get(timeout=self.poll_s)
            except queue.Empty:
                msg = None
            if msg is not None:
                rank, kind, jid, payload = msg
                if kind == "progress" and on_progress is not None:
                    on_progress(*payload)
                elif kind == "error" and jid == job:
                    last = payload.strip().splitlines()[-1]
                    self._watch(what, wait_s=1.0, then=f"; rank {rank} then failed with {last}")  # a peer died?
                    self._fail(WorkerError(f"sequence-parallel worker rank {rank} failed in {what}:\n{payload}"))
                elif kind != "progress" and jid == job:  # (a reply to an earlier job is late: dropped)
                    replies[rank] = (kind, payload)
                    continue
            self._watch(what)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                self._fail(WorkerError(f"sequence-parallel workers: {what} took over {timeout_s:g} s"))
            if check_interrupt is not None and interrupt is None:
                try:
                    check_interrupt()
                except BaseException as e:  # noqa: BLE001 (re-raised once every rank has stopped)
                    interrupt = e
                    self._stop.set()
        if any(kind == "interrupted" for kind, _ in replies.values()):
            raise interrupt if interrupt is not None else Interrupted(f"{what} was stopped")
        return replies[0][1]

    def _watch(self, what: str, wait_s: float = 0.0, then: str = "") -> None:
        """WorkerDied when a worker has ended (looking for `wait_s`: a peer's error may arrive before the death)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self._procs):
                if not p.is_alive():
                    code = p.exitcode
                    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
                    self._fail(
                        WorkerDied(
                            f"sequence-parallel worker rank {rank} (pid {p.pid}, {self.devices[rank]}) {how} "
                            f"during {what}{then}; all workers were stopped and the next run starts them again"
                        )
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _fail(self, error: Exception):
        self.stop(grace_s=1.0)  # the others may be inside a collective that will not finish
        raise error
