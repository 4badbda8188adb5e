"""Sequence-parallel worker processes: started once, each loading the DiT once, serving jobs until stopped.

    workers = Workers(DitFile("qwen_image_bf16.safetensors"), ["cuda:0", "cuda:1"])
    latents = workers.run(jobs.sample, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0)
    workers.stop()

The controller (this process, e.g. ComfyUI's) is not a rank: it starts one Python process per device
(`serve.py`), which join one torch.distributed group (`group.py`) and wait for jobs. They are plain
subprocesses, not multiprocessing children: inside ComfyUI the pack's modules are named by file path and
ComfyUI's main script must not run again in a child. Each talks to the controller over its own socket pair
(Linux / macOS) in plain data (`wire.py`). A job is a function of this package (or of a module on `paths`)
run on every rank as `fn(context, *args, **kwargs)`; rank 0's return value is the result. Failures never hang:

* an exception on any rank is raised here as `WorkerError` with that rank's traceback; the workers are then
  stopped (a rank may be left inside a collective) and the next `run` starts them again;
* a worker that dies (killed, out of memory) is seen within `poll_s` and raised as `WorkerDied` with the
  end of its log, the others stopped; peers blocked in a collective also give up after the group's timeout;
* `check_interrupt` (e.g. ComfyUI's interrupt check, which raises) is polled while a job runs; when it
  raises, every rank stops at the same step (`Context.stop_requested`) and its exception is re-raised here,
  the workers staying up;
* workers exit when the controller's socket closes, and `stop()` (also run at interpreter exit) ends them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from .group import check_devices
from .serve import Interrupted
from .wire import decode, encode, recv, reference, send

ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding qwen_image_core (the pack's folder)
BOOT = "from qwen_image_core.parallel.serve import main; main()"


class WorkerError(RuntimeError):
    """A job raised on a worker; the message carries the rank and its traceback."""


class WorkerDied(RuntimeError):
    """A worker process ended while the controller waited on it."""


@dataclass(frozen=True)
class DitFile:
    """The DiT each worker loads (`mmdit.load_dit(path, **options)`) onto its device, once. `budget`: device
    bytes the DiT may take on each worker: the offload planner keeps the blocks that fit resident and the
    executor streams the others from host memory every step (None: the whole DiT moves to the device)."""

    path: str
    options: tuple[tuple[str, object], ...] = ()
    budget: int | None = None


def _shutdown(procs, conns, logs, folder, grace_s: float = 5.0) -> None:
    """Ask every worker to exit, then kill those that do not (also run at interpreter exit)."""
    for c in conns:
        try:
            send(c, None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for c in [*conns, *logs]:
        c.close()
    shutil.rmtree(folder, ignore_errors=True)


def _log_tail(path: str, lines: int = 12) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class Workers:
    """One process per device holding the DiT of `dit`; `paths`: extra import folders for the workers' jobs."""

    def __init__(
        self,
        dit: DitFile,
        devices: Sequence[str],
        *,
        timeout_s: float = 120.0,  # collectives waiting longer raise on the workers
        start_timeout_s: float = 900.0,  # starting and loading the weights (a 41 GB file takes minutes)
        poll_s: float = 0.2,  # how often the watchdog looks at the processes and the interrupt check
        threads: int = 0,  # intra-op threads per worker (0: PyTorch's default)
        paths: Sequence[str] = (),
    ):
        self.devices = tuple(str(d) for d in devices)
        check_devices(self.devices)
        self.dit, self.timeout_s, self.start_timeout_s, self.poll_s = dit, timeout_s, start_timeout_s, poll_s
        self.threads, self.paths = threads, [str(p) for p in paths]
        self._procs, self._conns, self._logs, self._job, self._finalizer = [], [], [], 0, None
        self._pending = False  # a job was sent and not every rank has replied

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Start the workers and wait until every rank holds its model (no-op when they are up)."""
        if self.alive:
            return
        self.stop()
        folder = tempfile.mkdtemp(prefix="qwenpix-sp-")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
        config = {
            "devices": list(self.devices), "store": os.path.join(folder, "store"), "timeout_s": self.timeout_s,
            "threads": self.threads, "dit": self.dit.path, "options": dict(self.dit.options), "paths": self.paths,
            "budget": self.dit.budget,
        }  # fmt: skip
        self._log_paths = [os.path.join(folder, f"rank{r}.log") for r in range(len(self.devices))]
        for rank, log_path in enumerate(self._log_paths):
            mine, theirs = socket.socketpair()
            log = open(log_path, "wb")  # noqa: SIM115 (closed by _shutdown)
            proc = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(theirs.fileno()), str(rank)], env=env, cwd=folder,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=[theirs.fileno()],
            )  # fmt: skip
            theirs.close()
            conn = Connection(mine.detach())
            self._procs.append(proc)
            self._conns.append(conn)
            self._logs.append(log)
            send(conn, config)
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, self._logs, folder)
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
        msg = (self._job, reference(fn), encode(args), encode(kwargs))
        for c in self._conns:
            send(c, msg)
        self._pending = True  # until every rank has replied: a job left running would eat the next one's message
        try:
            return self._collect(self._job, fn.__name__, None, check_interrupt, on_progress)
        finally:
            if self._pending:  # left by an exception of our own (e.g. KeyboardInterrupt): the workers go
                self.stop(grace_s=1.0)

    def stop(self, grace_s: float = 5.0) -> None:
        """End the workers (idempotent): each is asked to exit, and killed after `grace_s`."""
        held = self._finalizer.detach() if self._finalizer is not None else None
        if held is not None:
            _shutdown(*held[2], grace_s=grace_s)
        self._procs, self._conns, self._logs, self._finalizer, self._pending = [], [], [], None, False

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
            for conn in wait([c for r, c in enumerate(self._conns) if r not in replies], timeout=self.poll_s):
                rank = self._conns.index(conn)
                try:
                    kind, jid, payload = recv(conn)
                except (EOFError, OSError):  # its end closed: it is exiting
                    self._watch(what, wait_s=5.0)
                    continue
                if kind == "progress" and on_progress is not None and interrupt is None:
                    try:
                        on_progress(*payload)
                    except BaseException as e:  # noqa: BLE001 (a host's progress hook may raise its interrupt)
                        interrupt = self._stop_job(e)
                elif kind == "error" and jid == job:
                    last = payload.strip().splitlines()[-1]
                    self._watch(what, wait_s=1.0, then=f"; rank {rank} then failed with {last}")  # a peer died?
                    self._fail(WorkerError(f"sequence-parallel worker rank {rank} failed in {what}:\n{payload}"))
                elif kind != "progress" and jid == job:  # (a reply to an earlier job is late: dropped)
                    replies[rank] = (kind, payload)
            self._watch(what)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                self._fail(WorkerError(f"sequence-parallel workers: {what} took over {timeout_s:g} s"))
            if check_interrupt is not None and interrupt is None:
                try:
                    check_interrupt()
                except BaseException as e:  # noqa: BLE001 (re-raised once every rank has stopped)
                    interrupt = self._stop_job(e)
        self._pending = False
        if interrupt is not None:
            raise interrupt
        if any(kind == "interrupted" for kind, _ in replies.values()):
            raise Interrupted(f"{what} was stopped")
        return decode(replies[0][1])

    def _stop_job(self, reason: BaseException) -> BaseException:
        """Ask every rank to stop the running job (they agree on the step); `reason` is raised once they have."""
        for c in self._conns:
            send(c, "stop")
        return reason

    def _watch(self, what: str, wait_s: float = 0.0, then: str = "") -> None:
        """WorkerDied when a worker has ended (looking for `wait_s`: a peer's error may arrive before the death)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self._procs):
                code = p.poll()
                if code is not None:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited ({code})"
                    tail = _log_tail(self._log_paths[rank])
                    self._fail(
                        WorkerDied(
                            f"sequence-parallel worker rank {rank} (pid {p.pid}, {self.devices[rank]}) {how} "
                            f"during {what}{then}; all workers were stopped and the next run starts them again"
                            + (f"\nits last output:\n{tail}" if tail else "")
                        )
                    )
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _fail(self, error: Exception):
        self.stop(grace_s=1.0)  # the others may be inside a collective that will not finish
        raise error
