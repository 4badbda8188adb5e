"""The progress seam: how long-running core work reports how far it got, and how a host stops it.

The core's functions take `check`, a no-argument callable called before each unit of work (a text-encoder layer, a
vision block, a VAE tile or decoder stage); whatever it raises stops the work there. A `Progress` is such a check
that also receives `step(done, total)` after each unit; a plain callable keeps working (no progress is reported).
Units are reported per loop: a node whose work has two loops (vision blocks, then text layers) reports two runs of
0..total.

Model loading opens its checkpoints deep inside the format readers, so a loader does not pass `check` down:
`with loading(progress):` makes every checkpoint read in that block (in this thread / context only) call the check
after each tensor and report the tensors read of the file's total, in at most `LOAD_STEPS` steps per file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

LOAD_STEPS = 100  # progress reports per checkpoint file at most (a 20B DiT has ~1900 tensors)


class Progress:
    """An interrupt check (`progress()`) with a progress callback (`progress.step(done, total)`)."""

    def __init__(
        self, check: Callable[[], None] | None = None, report: Callable[[int, int], None] | None = None
    ) -> None:
        self._check = check
        self._report = report

    def __call__(self) -> None:
        if self._check is not None:
            self._check()

    def step(self, done: int, total: int) -> None:
        if self._report is not None:
            self._report(done, total)


def step(check: Callable[[], None] | None, done: int, total: int) -> None:
    """Report `done` of `total` units to `check` if it is a Progress (anything with `step`); else nothing."""
    report = getattr(check, "step", None)
    if report is not None:
        report(done, total)


# the Progress of the model load running in this context (`loading`); None outside one
_LOADING: ContextVar[Callable[[], None] | None] = ContextVar("qwen_image_core_loading", default=None)


@contextmanager
def loading(progress: Callable[[], None] | None) -> Iterator[None]:
    """Checkpoint reads inside the block call `progress` before each tensor and report through `step` (see
    the module doc); None: no checks (the default outside any block)."""
    token = _LOADING.set(progress)
    try:
        yield
    finally:
        _LOADING.reset(token)


def tensor_read(done: int, total: int, fresh: bool = True) -> None:
    """Called by the checkpoint reader after each tensor it read (`done` distinct tensors so far of `total`;
    `fresh`: this tensor was not read before, so `done` grew)."""
    progress = _LOADING.get()
    if progress is None:
        return
    progress()
    unit = -(-total // LOAD_STEPS)  # ceil: at most LOAD_STEPS reports, then the last one
    if fresh and (done % unit == 0 or done == total):
        step(progress, done, total)


def silent(check: Callable[[], None] | None) -> Callable[[], None] | None:
    """The same interrupt check without progress reports: for inner loops (the decoder stages inside each tile)
    whose units the outer loop already counts."""
    if check is None or not hasattr(check, "step"):
        return check
    return lambda: check()
