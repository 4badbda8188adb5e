"""`torch.compile` of a model's blocks, one block at a time, switched on for a block of code.

Each block's `forward` is compiled (not the module call), so module hooks stay eager: the offload executor's
pre- and post-hooks (offload.py) bind each streamed block's weights before the compiled code runs, and the
compiled graph reads the parameters as inputs, so the `.data` swaps of streaming need no recompilation
(gpu_review §A4: per-block compile with streaming, max diff 0 with the eager backend, no recompiles with inductor).
All blocks share one code object, so they share the compiled graphs (Dynamo guards on shapes and dtypes, not on
which block). CUDA graphs ("reduce-overhead") are not offered: streamed parameters change address every pass.

`using(blocks, backend)` sets the compiled forwards for the duration of a block of code and restores the eager
ones after (the bridge: per forward, so MODELs of one file may differ); compiled callables are cached per block
and backend, so switching costs nothing after the first compile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

BACKENDS = ("off", "inductor", "eager")  # eager: Dynamo capture only (a test / debugging backend)


def compiled_forward(block: nn.Module, backend: str):
    """The block's forward compiled with `backend`, made once per block and backend."""
    cache = block.__dict__.setdefault("_qwenpix_compiled", {})
    if backend not in cache:
        cache[backend] = torch.compile(type(block).forward.__get__(block), backend=backend, dynamic=False)
    return cache[backend]


@contextmanager
def using(blocks: Sequence[nn.Module], backend: str = "inductor") -> Iterator[int]:
    """Each block's forward compiled with `backend` inside the block of code ("off": unchanged); yields the count."""
    if backend not in BACKENDS:
        raise ValueError(f"compile backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "off":
        yield 0
        return
    blocks = list(blocks)
    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        for b in blocks:
            b.forward = compiled_forward(b, backend)
        yield len(blocks)
    finally:
        for b, f in zip(blocks, saved, strict=True):
            if f is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f
