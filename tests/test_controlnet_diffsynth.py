"""DiffSynth blockwise ControlNets (ModelPatchLoader + QwenImageDiffsynthControlnet) on the bridged MODEL, in-process:
ComfyUI 0.3.75's own DiffSynthCnetPatch, set as a `double_block` patch, changes our NativeDiT's output exactly as it
changes ComfyUI's own Qwen-Image DiT (one full-width block, random patch weights; the Inpaint variant with a mask
too). ComfyUI fixes the widths (3072) and the patch's 60 blocks in its loader, so the patch is built here with one
block instead of through a 2 GB file."""

from __future__ import annotations

import gc
import importlib

import torch

from oracles import assert_close
from tools.checkpoints import dit as W
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()
import_pack()  # the pack as `qwenpix` (ComfyUI's modules importable first)
native_model = importlib.import_module("qwenpix.nodes.native_model")

import comfy.ops  # noqa: E402
from comfy_extras.nodes_model_patch import DiffSynthCnetPatch, QwenImageBlockWiseControlNet  # noqa: E402

from qwen_image_core.mmdit import load_dit  # noqa: E402


class FakeVAE:
    """What the patch reads off a VAE: encode(IMAGE [B, H, W, 3]) -> latent [B, 16, 1, H/8, W/8] (ComfyUI's Qwen
    VAE layout), the compression."""

    def encode(self, image):
        x = torch.nn.functional.avg_pool2d(image.movedim(-1, 1), 8)  # [B, 3, h, w]
        return torch.cat([x, x.flip(1) * 0.5, x**2, -x, x * 0.25, x[:, :1]], dim=1)[:, :, None]  # 16 channels

    def spacial_compression_encode(self):
        return 8


class Patch:
    def __init__(self, model):
        self.model = model


def blockwise(extra: int, seed: int):
    torch.manual_seed(seed)
    m = QwenImageBlockWiseControlNet(num_layers=1, additional_in_dim=extra, operations=comfy.ops.disable_weight_init)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.eval()


def test_diffsynth_patches_on_bridged_model_equal_comfyui(tmp_path):
    """Canny/depth (no extra channels) and Inpaint (a mask) variants, one model load per side."""
    from test_mmdit import comfy_model  # noqa: PLC0415

    path = W.write_comfy(tmp_path / "wide.safetensors", W.config(num_layers=1), dtype=torch.float32, seed=2)
    g = torch.Generator().manual_seed(4)
    x, txt, sigma = torch.randn(1, 16, 1, 8, 12, generator=g), torch.randn(1, 7, 3584, generator=g), torch.tensor([0.6])
    image = torch.rand(1, 64, 96, 3, generator=g)
    mask = 1.0 - (torch.rand(1, 1, 1, 64, 96, generator=g) > 0.5).float()  # as the node passes it
    variants = {"plain": None, "canny": (Patch(blockwise(0, 3)), None), "inpaint": (Patch(blockwise(4, 5)), mask)}

    def outputs(model):
        out = {}
        for name, v in variants.items():
            opts = (
                {}
                if v is None
                else {"patches": {"double_block": [DiffSynthCnetPatch(v[0], FakeVAE(), image, 0.7, v[1])]}}
            )
            with torch.no_grad():
                out[name] = model(x, sigma, txt, transformer_options=opts)
        return out

    got = outputs(native_model.NativeDiT(load_dit(path), torch.float32, positions="comfyui"))
    gc.collect()
    want = outputs(comfy_model(path))
    for name in variants:
        assert_close(got[name], want[name])
    assert (got["canny"] - got["plain"]).abs().max() > 1e-4 and (got["inpaint"] - got["plain"]).abs().max() > 1e-4
