"""Where our models' weights live while ComfyUI runs prompts.

The DiT (a native MODEL, `native_model.py`) and the text encoder are registered with ComfyUI's model
management through `patcher.QwenPixPatcher`: ComfyUI loads them with `load_models_gpu` before use, keeps
them loaded across prompts while memory allows, and evicts them, or shrinks them to a streaming plan, when
another model needs the room; its flags (`--novram`, `--lowvram`, `--highvram`, `--reserve-vram`) act through
its own budgets. On the CPU nothing moves. The VAE (about 250 MB) is moved per call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import comfy.model_management as mm
import torch
from torch import nn

from ..qwen_image_core.offload_plan import (
    DiTWorkload,
    detect_card,
    plan_dit,
    plan_text_encoder,
    text_encoder_activation_bytes,
)
from .patcher import QwenPixPatcher, placed_patcher

TEXT_TOKENS = 64  # planning estimate of a prompt's tokens; each edit image adds IMAGE_TOKENS
IMAGE_TOKENS = 1024


class TextEncoderModel(nn.Module):
    """The holder ComfyUI's model management sees for a text encoder (`encoder`: the QwenVL model, or
    Qwen-Image-2.1's Qwen3VL: the same `cfg` fields and `model.layers`, planned alike)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.tokens = TEXT_TOKENS  # the workload the next placement is planned for


def text_encoder_patcher(encoder: nn.Module) -> QwenPixPatcher:
    """The registered patcher of a loaded QwenVL encoder (one per encoder, kept on it)."""
    patcher = getattr(encoder, "native_patcher", None)
    if patcher is None:
        holder = TextEncoderModel(encoder)

        def plan_for(card, budget, max_resident):
            return plan_text_encoder(encoder, budget, card, holder.tokens, 1, 0, max_resident, activation_bytes=0)

        patcher = placed_patcher(
            holder, encoder, encoder.model.layers, plan_for, mm.text_encoder_device(), mm.text_encoder_offload_device()
        )
        encoder.native_patcher = patcher
    return patcher


def load_text_encoder(patcher: QwenPixPatcher, images: int, tokens: int | None = None) -> torch.device:
    """Have ComfyUI load the encoder for a prompt with `images` edit images; returns where it computes.
    tokens: the prompt's true token count (text + image slots) when the caller knows it, else an estimate."""
    holder, encoder = patcher.model, patcher.model.encoder
    holder.tokens = TEXT_TOKENS + IMAGE_TOKENS * images if tokens is None else tokens
    cfg = encoder.cfg
    activations = text_encoder_activation_bytes(holder.tokens, 1, cfg.hidden_size, cfg.intermediate_size)
    mm.load_models_gpu([patcher], memory_required=activations)
    return encoder.model.norm.weight.device


@contextmanager
def vae_on_device(vae: torch.nn.Module) -> Iterator[torch.device]:
    """The VAE on the compute device while a block runs; its tiling budget is what is free."""
    device = mm.get_torch_device()
    home = next(vae.parameters()).device
    if device.type == "cpu" or home == device:
        yield home
        return
    keep = mm.vram_state == mm.VRAMState.HIGH_VRAM
    mm.free_memory(sum(p.numel() * p.element_size() for p in vae.parameters()) + mm.minimum_inference_memory(), device)
    vae.to(device)
    try:
        yield device
    finally:
        if not keep:
            vae.to(home)
            mm.soft_empty_cache()


def describe_default_plan(model: torch.nn.Module) -> str:
    """One line for the loader node: where the weights will live for a typical job (1328x1328, CFG)."""
    device = mm.get_torch_device()
    if device.type == "cpu":
        return (
            f"CPU: weights stay in RAM in their stored dtype; computing on the CPU ({mm.get_torch_device_name(device)})"
        )
    reserve = mm.extra_reserved_memory() + mm.minimum_inference_memory()
    max_resident = 0 if mm.vram_state == mm.VRAMState.NO_VRAM else None
    total = mm.get_total_memory(device)  # what the plan may use once ComfyUI has freed its own models
    return plan_dit(model, total, detect_card(device), DiTWorkload(), reserve, max_resident).explain()
