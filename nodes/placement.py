"""Where our models' weights live while a ComfyUI prompt runs.

On the CPU nothing moves: models compute where their weights are. On a GPU the DiT (and the text encoder)
are planned with `qwen_image_core.offload_plan` for the free VRAM and placed by the executor in
`qwen_image_core.offload`/`placement`: resident blocks stay on the GPU, the others stream from pinned host
memory behind compute. Before placing, ComfyUI's model management is asked to free the room the plan
wants (`free_memory`), and its flags are honoured: `--novram` streams every block, `--reserve-vram` is kept
free, `--highvram` keeps our weights on the GPU between prompts; otherwise our VRAM is released after each
use so ComfyUI's own models get it back. The pinned host copies persist with the model between prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.model_management as mm
import torch

from ..qwen_image_core.offload import Transfer, default_transfer
from ..qwen_image_core.offload_plan import DiTWorkload, detect_card, plan_dit, plan_text_encoder
from ..qwen_image_core.placement import Offloaded


@dataclass
class Runtime:
    """Per loaded model: its executor state (pinned host copies) kept across prompts."""

    transfer: Transfer | None = None
    offloaded: Offloaded | None = None
    last_plan: str = field(default="")


def _flags() -> tuple[int, int | None, bool]:
    """(reserve bytes, max resident blocks or None, keep resident between prompts) from ComfyUI's flags."""
    reserve = mm.extra_reserved_memory() + mm.minimum_inference_memory()
    max_resident = 0 if mm.vram_state == mm.VRAMState.NO_VRAM else None
    return reserve, max_resident, mm.vram_state == mm.VRAMState.HIGH_VRAM


@contextmanager
def on_device(model: torch.nn.Module, blocks, runtime: Runtime, planner_for) -> Iterator[Offloaded | None]:
    """Place `model` on ComfyUI's compute device for the duration of a block, as planned by
    `planner_for(card, reserve, max_resident) -> planner`; a no-op on the CPU."""
    device = mm.get_torch_device()
    if device.type == "cpu":
        yield None
        return
    reserve, max_resident, keep = _flags()
    runtime.transfer = runtime.transfer or default_transfer(device)
    planner = planner_for(detect_card(device), reserve, max_resident)
    wanted = planner(1 << 62, max_resident).device_bytes  # what the all-resident (or --novram) plan would hold
    mm.free_memory(wanted, device)  # ComfyUI unloads its own models until there is room (or it has none left)
    if runtime.offloaded is None:
        runtime.offloaded = Offloaded(model, blocks, planner, runtime.transfer)
    runtime.offloaded.planner = planner
    if not runtime.offloaded.attached:
        runtime.offloaded.attach(max_resident)
    runtime.last_plan = runtime.offloaded.plan.explain()
    try:
        yield runtime.offloaded
    finally:
        if not keep:
            runtime.offloaded.detach()  # releases our VRAM; the pinned host copies stay for the next prompt
            runtime.transfer.empty_cache()


@contextmanager
def vae_on_device(vae: torch.nn.Module) -> Iterator[torch.device]:
    """The VAE (about 250 MB) on the compute device while a block runs; its tiling budget is what is free."""
    device = mm.get_torch_device()
    home = next(vae.parameters()).device
    if device.type == "cpu" or home == device:
        yield home
        return
    _, _, keep = _flags()
    mm.free_memory(sum(p.numel() * p.element_size() for p in vae.parameters()) + mm.minimum_inference_memory(), device)
    vae.to(device)
    try:
        yield device
    finally:
        if not keep:
            vae.to(home)
            mm.soft_empty_cache()


def dit_planner(model, workload: DiTWorkload):
    def planner_for(card, reserve, max_resident):
        return lambda free, mr: plan_dit(model, free, card, workload, reserve, max_resident if mr is None else mr)

    return planner_for


def text_encoder_planner(model, tokens: int):
    def planner_for(card, reserve, max_resident):
        return lambda free, mr: plan_text_encoder(
            model, free, card, tokens, 1, reserve, max_resident if mr is None else mr
        )

    return planner_for


def describe_default_plan(model: torch.nn.Module) -> str:
    """One line for the loader node: where the weights will live for a typical job (1328x1328, CFG)."""
    device = mm.get_torch_device()
    if device.type == "cpu":
        return (
            f"CPU: weights stay in RAM in their stored dtype; computing on the CPU ({mm.get_torch_device_name(device)})"
        )
    reserve, max_resident, _ = _flags()
    total = mm.get_total_memory(device)  # what the plan may use once ComfyUI has freed its own models
    return plan_dit(model, total, detect_card(device), DiTWorkload(), reserve, max_resident).explain()
