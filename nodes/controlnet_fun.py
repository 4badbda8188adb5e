"""The Fun Qwen-Image ControlNet Union (2512) as ComfyUI's own CONTROL_NET, loaded by "Load Qwen-Image ControlNet"
(`nodes/controlnet.py`), so ControlNetApplyAdvanced (strength, start / end percent, the VAE-encoded and
normalised hint, chaining with other ControlNets) drives it as newer ComfyUI's loader does (v0.14.0).

The Fun branch runs on the sampled DiT's own input layers (`qwen_image_core.controlnet_fun`): the ControlNet
takes the model being sampled from `pre_run` (ComfyUI's hook before sampling; newer ComfyUI passes it as
`base_model` the same way) and gives its hints to the DiT blocks they follow, None elsewhere. It needs the
QwenPix diffusion model loader's MODEL; on another model it stops with an error saying so. ComfyUI's apply
nodes give it a control image only: the branch's inpaint mask and image channels are zeros (control mode).
"""

from __future__ import annotations

import comfy.controlnet
import comfy.latent_formats
import comfy.model_management
import torch
from torch import nn

from ..qwen_image_core.controlnet_fun import FunControlNet, load_fun_controlnet
from . import host
from .native_model import NativeDiT, host_attention


class ComfyFunControlNet(nn.Module):
    """ComfyUI's control-model interface over the core Fun branch: forward(x, timesteps, context, hint,
    base_model) -> {"input": one entry per DiT block, the hint after the blocks it enters, else None}."""

    def __init__(self, net: FunControlNet, dtype: torch.dtype, positions: str):
        super().__init__()
        self.net, self.dtype, self.positions = net, dtype, positions

    def forward(self, x, timesteps, context, hint=None, base_model=None, txt_lengths=None, **kwargs):
        if not isinstance(base_model, NativeDiT):
            raise ValueError(
                "the Fun Qwen-Image ControlNet runs on the diffusion model's own input layers and needs the MODEL of "
                "the QwenPix diffusion model loader (Load Qwen-Image Diffusion Model); this MODEL is "
                f"{type(base_model).__name__}"
            )
        dit = base_model.core
        img = x[:, :, 0] if x.ndim == 5 else x
        control = hint[:, :, 0] if hint.ndim == 5 else hint
        hints = self.net(
            dit, img.to(self.dtype), timesteps, context.to(self.dtype), control.to(self.dtype),
            positions=self.positions, attention_fn=host_attention({}), txt_lengths=txt_lengths,
        )  # fmt: skip
        return {"input": [hints.get(i) for i in range(len(dit.transformer_blocks))]}


class FunControlNetHandle(comfy.controlnet.ControlNet):
    """ComfyUI's ControlNet, handing the sampled model's diffusion model to the Fun branch as `base_model`
    (set in pre_run, dropped in cleanup); copies keep the class."""

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.extra_args = {**self.extra_args, "base_model": model.diffusion_model}

    def cleanup(self):
        self.extra_args = {k: v for k, v in self.extra_args.items() if k != "base_model"}
        super().cleanup()

    def copy(self):
        c = FunControlNetHandle(
            None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
            manual_cast_dtype=self.manual_cast_dtype,
        )  # fmt: skip
        c.control_model, c.control_model_wrapped = self.control_model, self.control_model_wrapped
        self.copy_to(c)
        return c


def control_net(net: FunControlNet, dtype: torch.dtype, positions: str, patcher=None) -> FunControlNetHandle:
    """The CONTROL_NET: the hint VAE-encoded at the latent's size and normalised (the Wan 2.1 latent format
    ComfyUI uses for Qwen-Image), no mask concatenated (the apply nodes' inpaint mask is not taken); each row's
    real text length from the conditioning (the official positions' zero-padded batches), as the DiT gets it.
    `patcher(net)`: the registered patcher ComfyUI's model management loads (`controlnet.controlnet_patcher`)."""
    control = FunControlNetHandle(
        ComfyFunControlNet(net, dtype, positions), compression_ratio=1, latent_format=comfy.latent_formats.Wan21(),
        concat_mask=False, load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None,
        extra_conds=["txt_lengths"],
    )  # fmt: skip
    if patcher is not None:
        control.control_model_wrapped = patcher(net)  # what `get_models` gives ComfyUI to load
    return control


def plan_line(net: FunControlNet) -> str:
    """What the loader shows: kind, blocks, where the hints enter, storage and size, and what it does not take."""
    held = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    size = f"{held / 1e9:.2f} GB" if held >= 1e8 else f"{held / 1e6:.1f} MB"
    layers = ", ".join(map(str, net.config.injection_layers))
    return (
        f"Fun ControlNet Union: {net.config.num_blocks} blocks, hints after DiT blocks {layers}, "
        f"{net.storage or 'weights'}; {size}, resident while ComfyUI's budget for it holds it, else its blocks "
        "stream (registered with ComfyUI's model management beside the DiT); "
        "control images only (its inpaint mode is not fed by ComfyUI's apply nodes)"
    )


def load(path, dtype: torch.dtype, positions: str, patcher=None) -> dict:
    """The loader node's result for a Fun ControlNet file (cached as the other model files)."""
    net = host.MODELS.get("FunControlNet", path, lambda: load_fun_controlnet(path))
    return {"ui": {"qwenpix_plan": [plan_line(net)]}, "result": (control_net(net, dtype, positions, patcher),)}
