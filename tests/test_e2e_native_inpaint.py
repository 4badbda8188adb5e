"""Inpainting nodes on the native MODEL, through the real server: ComfyUI's SetLatentNoiseMask, InpaintModelConditioning
(noise mask on) and DifferentialDiffusion (a graded mask) drive our bridged MODEL exactly as ComfyUI's own Qwen-Image
model from the same file (latents within 1e-4; the "ComfyUI native" positions), and the mask does act."""

from __future__ import annotations

import pytest
import torch

from native_graphs import close, common, differs, ksampler, models, node, run, twin
from tools.checkpoints import dit as D

pytestmark = pytest.mark.e2e
DIT = "qp_native_wide_f32.safetensors"  # the same file (config, seed) as test_e2e_native_model's


@pytest.fixture(scope="module")
def runs(comfy, tiny_comfy_vae):
    path = comfy.models_dir / "diffusion_models" / DIT
    if not path.exists():
        D.write_comfy(path, D.config(num_layers=1), dtype=torch.float32)
    graph = {
        **common(), **models(DIT),
        "vae": node("VAELoader", vae_name=tiny_comfy_vae),
        "img": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=3),
        "noise_img": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=9),
        "graded": node("ImageToMask", image=["noise_img", 0], channel="red"),  # a graded mask
        "mask": node("ThresholdMask", mask=["graded", 0], value=0.5),  # a binary one
        "enc": node("VAEEncode", pixels=["img", 0], vae=["vae", 0]),
        "noise_mask": node("SetLatentNoiseMask", samples=["enc", 0], mask=["mask", 0]),
        "graded_mask": node("SetLatentNoiseMask", samples=["enc", 0], mask=["graded", 0]),
        "imc": node("InpaintModelConditioning", positive=["pos", 0], negative=["neg", 0], vae=["vae", 0],
                    pixels=["img", 0], mask=["mask", 0], noise_mask=True),
    }  # fmt: skip
    twin(graph, "noise_mask", lambda s: {"k": ksampler(f"{s}_ms", steps=3, lat="noise_mask", denoise=0.8)})
    twin(graph, "full_denoise", lambda s: {"k": ksampler(f"{s}_ms", steps=3, lat="enc", denoise=0.8)})
    twin(graph, "inpaint_conditioning", lambda s: {"k": ksampler(f"{s}_ms", steps=3, pos="imc", neg="imc", lat="imc")})
    for s in ("o", "n"):  # InpaintModelConditioning: positive 0, negative 1, latent 2
        graph[f"inpaint_conditioning_{s}_k"]["inputs"].update(negative=["imc", 1], latent_image=["imc", 2])
    twin(graph, "differential", lambda s: {
        "dd": node("DifferentialDiffusion", model=[f"{s}_ms", 0]),
        "k": ksampler("dd", steps=3, lat="graded_mask"),
    })  # fmt: skip
    for s in ("o", "n"):
        graph[f"differential_{s}_k"]["inputs"]["model"] = [f"differential_{s}_dd", 0]
    run(comfy, graph)
    return comfy


@pytest.mark.parametrize("case", ["noise_mask", "inpaint_conditioning", "differential"])
def test_inpaint_nodes_match_comfyuis_model(runs, case):
    assert close(runs, case) <= 1e-4


def test_noise_mask_acts(runs):
    differs(runs, "noise_mask_o", "full_denoise_o")
