"""Our Qwen-Image Sampler's check of the ControlNets in a conditioning, in process (ComfyUI's modules, no server):
Qwen-Image ControlNets (ComfyUI's InstantX model, the pack's) pass; a ControlNet of another model (ComfyUI's Flux
ControlNet, a T2I adapter), also one stacked under a Qwen-Image one, is an error naming the input and the class
(KSampler would fail inside ComfyUI's code instead). Honouring the Qwen-Image ones is test_e2e_sampler_control's."""

from __future__ import annotations

import importlib

import pytest
import torch

from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as W
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.controlnet  # noqa: E402
import comfy.ldm.flux.controlnet  # noqa: E402
import comfy.ldm.qwen_image.controlnet  # noqa: E402
import comfy.ops  # noqa: E402

import_pack()
sampler = importlib.import_module("qwenpix.nodes.sampler")
controlnet_node = importlib.import_module("qwenpix.nodes.controlnet")
core_cn = importlib.import_module("qwenpix.qwen_image_core.controlnet")
InputError = importlib.import_module("qwenpix.nodes.checks").InputError
OPS = comfy.ops.disable_weight_init


def ours() -> comfy.controlnet.ControlNet:
    cfg = W.tiny_config(num_layers=1)
    net = core_cn.InstantXControlNet(cfg)
    net.load_state_dict(C.state_dict(cfg), assign=True)
    return controlnet_node.comfy_control(net, torch.float32, "official")


def comfyui_qwen() -> comfy.controlnet.ControlNet:
    model = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(num_layers=1, operations=OPS, device="meta")
    return comfy.controlnet.ControlNet(model, compression_ratio=1, load_device=torch.device("cpu"), extra_conds=[])


def flux() -> comfy.controlnet.ControlNet:
    model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=True, in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=8, hidden_size=32,
        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=False, operations=OPS, device="meta",
    )  # fmt: skip
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"))


def conditioning(control) -> list:
    return [[torch.zeros(1, 4, 40), {"control": control}]]


def test_qwen_image_controlnets_pass():
    stacked = ours().set_previous_controlnet(comfyui_qwen())
    sampler.check_controls("positive", conditioning(stacked))
    sampler.check_controls("negative", [[torch.zeros(1, 4, 40), {}]])  # no control


@pytest.mark.parametrize(
    ("make", "what"),
    [(flux, "ControlNetFlux"), (lambda: ours().set_previous_controlnet(flux()), "ControlNetFlux"),
     (lambda: comfy.controlnet.T2IAdapter(torch.nn.Identity(), 3, 8, "nearest-exact", "cpu"), "T2IAdapter")],
    ids=["flux", "flux-under-ours", "t2i-adapter"],
)  # fmt: skip
def test_controlnets_of_other_models_are_named(make, what):
    with pytest.raises(InputError, match=rf"negative: a ControlNet applied to it \({what}\) is not a Qwen-Image") as e:
        sampler.check_controls("negative", conditioning(make()))
    assert "Fix: load an InstantX Qwen-Image ControlNet" in str(e.value)
