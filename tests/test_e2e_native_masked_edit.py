"""A masked edit with ComfyUI's own nodes on the bridged MODEL, through the real server: the picture as the edit
reference (ReferenceLatent on both prompts) and as the start latent with SetLatentNoiseMask, sampled by KSampler,
gives the latents of ComfyUI's own Qwen-Image model from the same file (within 1e-4; "ComfyUI native" positions);
the mask acts (the result differs from the unmasked edit), and ImageCompositeMasked puts the decoded edit back
into the picture with the pixels outside the mask equal to the picture's (tolerance 0). In the same prompt, a
DiffSynth blockwise ControlNet through ComfyUI's own ModelPatchLoader (a full-shape patch file under 1 MB,
tools/checkpoints/diffsynth.py) + QwenImageDiffsynthControlnet on the bridged MODEL equals it on ComfyUI's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from native_graphs import close, common, differs, ksampler, load, models, node, run, twin
from tools.checkpoints import dit as D
from tools.checkpoints.diffsynth import write_patch

pytestmark = pytest.mark.e2e
DIT = "qp_native_wide_f32.safetensors"  # the same file (config, seed) as test_e2e_native_inpaint's
PATCH = "qp_diffsynth_canny_strided.pt"


@pytest.fixture(scope="module")
def runs(comfy, tiny_comfy_vae):
    path = comfy.models_dir / "diffusion_models" / DIT
    if not path.exists():
        D.write_comfy(path, D.config(num_layers=1), dtype=torch.float32)
    write_patch(comfy.models_dir / "model_patches" / PATCH, seed=3)
    graph = {
        **common(width=80, height=48), **models(DIT),
        "vae": node("VAELoader", vae_name=tiny_comfy_vae),
        "img": node("QwenPixTestImage", kind="rgb", width=80, height=48, seed=3),
        "mask": node("QwenPixTestMask", width=80, height=48),
        "enc": node("VAEEncode", pixels=["img", 0], vae=["vae", 0]),
        "ref_pos": node("ReferenceLatent", conditioning=["pos", 0], latent=["enc", 0]),
        "ref_neg": node("ReferenceLatent", conditioning=["neg", 0], latent=["enc", 0]),
        "masked": node("SetLatentNoiseMask", samples=["enc", 0], mask=["mask", 0]),
    }  # fmt: skip
    twin(
        graph, "masked_edit", lambda s: {"k": ksampler(f"{s}_ms", steps=3, pos="ref_pos", neg="ref_neg", lat="masked")}
    )
    twin(graph, "edit", lambda s: {"k": ksampler(f"{s}_ms", steps=3, pos="ref_pos", neg="ref_neg", lat="enc")})
    graph["patch"] = node("ModelPatchLoader", name=PATCH)
    twin(graph, "diffsynth", lambda s: {
        "m": node("QwenImageDiffsynthControlnet", model=[f"{s}_ms", 0], model_patch=["patch", 0], vae=["vae", 0],
                  image=["img", 0], strength=0.8),
        "k": ksampler("m", steps=2),
    })  # fmt: skip
    twin(graph, "no_patch", lambda s: {"k": ksampler(f"{s}_ms", steps=2)})
    graph.update({
        "dec": node("VAEDecode", samples=["masked_edit_o_k", 0], vae=["vae", 0]),
        "comp": node("ImageCompositeMasked", destination=["img", 0], source=["dec", 0], x=0, y=0,
                     resize_source=False, mask=["mask", 0]),
        "dump_comp": node("QwenPixTestDumpImage", images=["comp", 0], name="composite"),
        "dump_img": node("QwenPixTestDumpImage", images=["img", 0], name="picture"),
    })  # fmt: skip
    run(comfy, graph)
    return comfy


def test_masked_edit_matches_comfyuis_model(runs):
    assert close(runs, "masked_edit") <= 1e-4
    differs(runs, "masked_edit_o", "edit_o")


def test_composite_keeps_the_unmasked_pixels_exactly(runs):
    out, picture = load(runs, "composite"), load(runs, "picture")
    assert out.shape == picture.shape
    keep = np.zeros(picture.shape[1:3], dtype=bool)
    keep[:, 40:] = True  # QwenPixTestMask: 1 on the left half, 0 on the right
    assert np.array_equal(out[:, keep], picture[:, keep])  # tolerance 0
    assert np.abs(out[:, ~keep] - picture[:, ~keep]).max() > 1e-3


def test_diffsynth_patch_through_modelpatchloader_matches_comfyuis_model(runs):
    assert (runs.models_dir / "model_patches" / PATCH).stat().st_size < 1 << 20
    assert close(runs, "diffsynth") <= 1e-4
    differs(runs, "diffsynth_o", "no_patch_o")
