"""The InstantX Qwen-Image ControlNet loader: the core's ControlNet (`qwen_image_core.controlnet`: Union and
Inpainting, from ComfyUI single files or diffusers folders, float8 kept float8) handed to ComfyUI as its own
CONTROL_NET, so ComfyUI's apply nodes (ControlNetApplyAdvanced, ControlNetInpaintingAliMamaApply), strengths,
timestep ranges, hint preprocessing (VAE encode, latent normalisation, the inpainting mask) and model management
drive it, on our bridged MODEL and on ComfyUI's own Qwen-Image model alike.

Memory: the ControlNet is registered with ComfyUI's model management through the pack's own patcher
(`patcher.QwenPixPatcher`, one per loaded file, shared by every CONTROL_NET made of it) at its true size. ComfyUI
loads it beside the DiT before sampling (`get_models`) and gives it a budget of its own; the pack's planner
(`control_offload.plan_controlnet`) keeps the blocks that fit resident and the executor streams the rest, as for
the DiT. `--lowvram`, `--novram` and evictions act on it through ComfyUI's budgets. (ComfyUI's plain ModelPatcher
would leave the layers that do not fit on the CPU: the pack's layers are not ComfyUI's casting ops.)

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

from ..qwen_image_core.control_offload import plan_controlnet, plan_fun_controlnet
from ..qwen_image_core.controlnet import InstantXControlNet, load_controlnet
from ..qwen_image_core.formats.controlnet_fun import is_fun_file
from ..qwen_image_core.offload_plan import DiTWorkload
from . import controlnet_fun, host
from .native_model import POSITIONS
from .patcher import QwenPixPatcher, placed_patcher

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


class ControlNetWeights(nn.Module):
    """The holder ComfyUI's model management sees for a ControlNet (`net`: the core ControlNet)."""

    def __init__(self, net: InstantXControlNet):
        super().__init__()
        self.net = net


def controlnet_patcher(net: nn.Module) -> QwenPixPatcher:
    """The registered patcher of a loaded ControlNet, InstantX or Fun (one per ControlNet, kept on it): ComfyUI
    loads it with `load_models_gpu` and our planner places its blocks within the budget ComfyUI gives it."""
    patcher = getattr(net, "native_patcher", None)
    if patcher is None:
        fun = net.kind == "fun"
        plan, blocks = (plan_fun_controlnet, net.control_blocks) if fun else (plan_controlnet, net.transformer_blocks)

        def plan_for(card, budget, max_resident):  # ComfyUI's budget already leaves room for the activations
            return plan(net, budget, card, DiTWorkload(), 0, max_resident, activation_bytes=0)

        patcher = placed_patcher(ControlNetWeights(net), net, blocks, plan_for)
        patcher.set_attachments("qwenpix_name", str(net.path.name if net.path else f"{net.kind} ControlNet"))
        net.native_patcher = patcher
    return patcher


def plan_line(net: InstantXControlNet) -> str:
    """What the loader shows: kind, blocks, storage and size, and where it runs."""
    held = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    size = f"{held / 1e9:.2f} GB" if held >= 1e8 else f"{held / 1e6:.1f} MB"
    return (
        f"InstantX {net.kind} ControlNet: {net.config.num_layers} blocks, {net.storage or 'weights'}; {size}, "
        "resident while ComfyUI's budget for it holds it, else its blocks stream (registered with ComfyUI's "
        "model management beside the DiT)"
    )


class QwenPixControlNetLoader:
    DISPLAY_NAME = "Load Qwen-Image ControlNet"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONTROL_NET",)
    OUTPUT_TOOLTIPS = ("A ControlNet for ComfyUI's Apply ControlNet nodes (Inpainting: the AliMama inpaint node).",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads an InstantX Qwen-Image ControlNet (Union: canny / soft edge / depth / pose; Inpainting) or the Fun "
        "ControlNet Union for Qwen-Image-2512 from models/controlnet or a diffusers folder, float8 kept in float8. "
        "The Fun one needs the pack's diffusion model and takes control images only. Files of other models are named."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net_name": (
                    host.model_names("controlnet", "controlnet"),
                    {
                        "tooltip": "Qwen-Image-InstantX-ControlNet-Union / -Inpainting or "
                        "Qwen-Image-2512-Fun-Controlnet-Union from models/controlnet."
                    },
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
        fix = "choose an InstantX Qwen-Image ControlNet (Union or Inpainting) or the Fun ControlNet Union (2512)"
        with host.input_problem("control_net_name", control_net_name, fix):
            path = host.model_path("controlnet", control_net_name, "controlnet")
            if is_fun_file(path):  # the Fun ControlNet Union (2512): a branch on the DiT's own input layers
                return controlnet_fun.load(path, DTYPES[compute_dtype], POSITIONS[positions], controlnet_patcher)
            net = host.MODELS.get("ControlNet", path, lambda: load_controlnet(path))
        control = comfy_control(net, DTYPES[compute_dtype], POSITIONS[positions])
        return {"ui": {"qwenpix_plan": [plan_line(net)]}, "result": (control,)}


def comfy_control(net: InstantXControlNet, dtype: torch.dtype, positions: str) -> comfy.controlnet.ControlNet:
    """ComfyUI's CONTROL_NET over the core ControlNet, its memory managed through `controlnet_patcher`."""
    control = comfy.controlnet.ControlNet(
        None, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(), concat_mask=net.kind == "inpaint",
        load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None, extra_conds=[],
    )  # fmt: skip
    control.control_model = ComfyControlNet(net, dtype, positions)
    control.control_model_wrapped = controlnet_patcher(net)  # what `get_models` gives ComfyUI to load
    return control


NODES = {"QwenPixControlNetLoader": QwenPixControlNetLoader}
