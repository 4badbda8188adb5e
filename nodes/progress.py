"""ComfyUI's progress bar and cancel button for the core's progress seam (`qwen_image_core.progress`).

`node_progress()` is what a node passes as `check`: ComfyUI's interrupt check before each unit, and
`comfy.utils.ProgressBar` updates after it, which ComfyUI sends to the websocket as "progress" messages of the
running node (its id comes from ComfyUI's executing context, as for ComfyUI's own nodes).
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch

from ..qwen_image_core.progress import Progress


def check_interrupt() -> None:
    """ComfyUI's cancel button, checked between blocks, layers and tiles (ComfyUI's own layers check it in every
    op); skipped while torch.compile traces (a host call there would break the graph)."""
    if not torch.compiler.is_compiling():
        comfy.model_management.throw_exception_if_processing_interrupted()


def node_progress() -> Progress:
    """A Progress for the running node: the interrupt check and a ComfyUI progress bar (created now, sized by
    each report: a node with two loops shows two runs of the bar)."""
    bar = comfy.utils.ProgressBar(1)

    def report(done: int, total: int) -> None:
        if not torch.compiler.is_compiling():
            bar.update_absolute(done, total)  # ComfyUI's hook also raises if the prompt was interrupted

    return Progress(check_interrupt, report)
