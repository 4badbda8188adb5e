"""The InstantX Qwen-Image ControlNet loader: the core's ControlNet (`qwen_image_core.controlnet`: Union and
Inpainting, from ComfyUI single files or diffusers folders, float8 kept float8) handed to ComfyUI as its own
CONTROL_NET, so ComfyUI's apply nodes (ControlNetApplyAdvanced, ControlNetInpaintingAliMamaApply), strengths,
timestep ranges, hint preprocessing (VAE encode, latent normalisation, the inpainting mask) and model management
drive it, on our bridged MODEL and on ComfyUI's own Qwen-Image model alike.

Residuals follow ComfyUI's convention for this model: residual i of the ControlNet serves ceil(60 / n) DiT blocks
in a row (the real DiT's 60), the list cut at 60.
"""

from __future__ import annotations

import math

import comfy.controlnet
import comfy.latent_formats
import comfy.model_management
import torch
from torch import nn

from ..qwen_image_core.controlnet import InstantXControlNet, load_controlnet
from . import host
from .native_model import POSITIONS

CATEGORY = "QwenPix/loaders"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAIN_BLOCKS = 60  # blocks of the real Qwen-Image DiT, which ComfyUI spreads the residuals over


class ComfyControlNet(nn.Module):
    """ComfyUI's control-model interface over the core ControlNet: forward(x, timesteps, context, hint) ->
    {"input": one residual per DiT block}. x [B, 16, 1, H, W] or [B, 16, H, W]; hint the control latent."""

    def __init__(self, net: InstantXControlNet, dtype: torch.dtype, positions: str):
        super().__init__()
        self.net, self.dtype, self.positions = net, dtype, positions

    def forward(self, x, timesteps, context, hint=None, **kwargs):
        img = x[:, :, 0] if x.ndim == 5 else x
        control = hint[:, :, 0] if hint.ndim == 5 else hint
        res = self.net(img.to(self.dtype), timesteps, context.to(self.dtype), control, positions=self.positions)
        repeat = math.ceil(MAIN_BLOCKS / len(res))
        return {"input": [r for r in res for _ in range(repeat)][:MAIN_BLOCKS]}


def plan_line(net: InstantXControlNet) -> str:
    """What the loader shows: kind, blocks, storage and size, and where it runs (ComfyUI loads it whole)."""
    held = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    size = f"{held / 1e9:.2f} GB" if held >= 1e8 else f"{held / 1e6:.1f} MB"
    return (
        f"InstantX {net.kind} ControlNet: {net.config.num_layers} blocks, {net.storage or 'weights'}; {size}, "
        "resident (ComfyUI's model management loads it whole beside the DiT; not streamed)"
    )


class QwenPixControlNetLoader:
    DISPLAY_NAME = "Load Qwen-Image ControlNet"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONTROL_NET",)
    OUTPUT_TOOLTIPS = ("A ControlNet for ComfyUI's Apply ControlNet nodes (Inpainting: the AliMama inpaint node).",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads an InstantX Qwen-Image ControlNet (Union: canny / soft edge / depth / pose; Inpainting) from "
        "models/controlnet or a diffusers folder, float8 kept in float8. Files of other models are named."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net_name": (
                    host.model_names("controlnet", "controlnet"),
                    {"tooltip": "Qwen-Image-InstantX-ControlNet-Union / -Inpainting from models/controlnet."},
                ),
                "compute_dtype": (list(DTYPES), {"default": "bf16", "tooltip": "The dtype it computes in."}),
                "positions": (
                    list(POSITIONS),
                    {"tooltip": "Token positions, as for the diffusion model (ComfyUI native: as ComfyUI's loader)."},
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, control_net_name: str, **other_inputs):
        return host.model_fingerprint("controlnet", control_net_name, "controlnet")

    def load(self, control_net_name: str, compute_dtype: str = "bf16", positions: str = "official (diffusers)"):
        fix = "choose an InstantX Qwen-Image ControlNet (Union or Inpainting) from models/controlnet"
        with host.input_problem("control_net_name", control_net_name, fix):
            path = host.model_path("controlnet", control_net_name, "controlnet")
            net = host.MODELS.get("ControlNet", path, lambda: load_controlnet(path))
        model = ComfyControlNet(net, DTYPES[compute_dtype], POSITIONS[positions])
        control = comfy.controlnet.ControlNet(
            model, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(), concat_mask=net.kind == "inpaint",
            load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None, extra_conds=[],
        )  # fmt: skip
        return {"ui": {"qwenpix_plan": [plan_line(net)]}, "result": (control,)}


NODES = {"QwenPixControlNetLoader": QwenPixControlNetLoader}
