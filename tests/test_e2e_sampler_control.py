"""Our Qwen-Image Sampler with ControlNets and noise masks, through the real server: the conditioning that
ControlNetApplyAdvanced / ControlNetInpaintingAliMamaApply make (with the pack's ControlNet loader) and a latent's
SetLatentNoiseMask are honoured as KSampler honours them (ComfyUI's guider runs the ControlNet each step and our
MODEL adds its residuals after each block): the same latents as KSampler on the same MODEL, and not those of the
graph without the control. Mask edge cases: an empty mask keeps the input latent exactly, a full mask equals no
mask, a mask of another size is stretched as ComfyUI does (another aspect ratio with a warning), a mask batch
that is neither 1 nor the latent's is refused naming the input; a ControlNet file of another model is refused
by our loader, naming the file's family. Tiny models (the pack's loaders read their sizes from the files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs import fails
from native_graphs import add_case, differs, load, node, run, same
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as W
from tools.checkpoints.dit import write_safetensors

pytestmark = pytest.mark.e2e
DIT, CNET, INPAINT = "qp_sc_dit.safetensors", "qp_sc_cn_union.safetensors", "qp_sc_cn_inpaint.safetensors"
CFG, NET = W.tiny_config(num_layers=2), W.tiny_config(num_layers=1)
FOREIGN = {  # ControlNets of other models (their characteristic keys) under models/controlnet
    "qp_sc_flux_cn.safetensors": (["controlnet_x_embedder.weight", "x_embedder.weight", "controlnet_blocks.0.weight",
                                   "controlnet_single_blocks.0.weight"], "Flux ControlNet"),
    "qp_sc_sdxl_cn.safetensors": (["controlnet_cond_embedding.conv_in.weight",
                                   "down_blocks.0.resnets.0.conv1.weight"], "SDXL ControlNet"),
}  # fmt: skip


@pytest.fixture(scope="module")
def server(comfy, tiny_comfy_vae):
    W.write_comfy(comfy.models_dir / "diffusion_models" / DIT, CFG, dtype=torch.float32, seed=11)
    C.write_instantx(comfy.models_dir / "controlnet" / CNET, NET, seed=12, dtype=torch.float32)
    C.write_instantx(comfy.models_dir / "controlnet" / INPAINT, NET, seed=13, dtype=torch.float32, extra_channels=4)
    for name, (keys, _) in FOREIGN.items():
        write_safetensors(comfy.models_dir / "controlnet" / name,
                          [(k, (4, 4), torch.float32, lambda: torch.zeros(4, 4)) for k in keys])  # fmt: skip
    return comfy, tiny_comfy_vae


def ours(pos="pos", neg="neg", lat="lat", steps=3, denoise=1.0, neg_slot=0):
    return node("QwenPixSampler", dit=["dit", 0], positive=[pos, 0], negative=[neg, neg_slot], latent_image=[lat, 0],
                seed=5, steps=steps, cfg=4.0, sampler_name="euler", schedule="shift (ComfyUI workflows)", shift=3.1,
                cfg_rescale="none", denoise=denoise)  # fmt: skip


def ks(pos="pos", neg="neg", lat="lat", steps=3, denoise=1.0, neg_slot=0):
    return node("KSampler", model=["ms", 0], seed=5, steps=steps, cfg=4.0, sampler_name="euler", scheduler="simple",
                positive=[pos, 0], negative=[neg, neg_slot], latent_image=[lat, 0], denoise=denoise)  # fmt: skip


def cn_loader(name: str) -> dict:
    return node(
        "QwenPixControlNetLoader", control_net_name=name, compute_dtype="fp32", positions="official (diffusers)"
    )


def base(vae: str) -> dict:
    return {
        "dit": node("QwenPixDiTLoader", dit_name=DIT, compute_dtype="fp32", positions="official (diffusers)"),
        "ms": node("ModelSamplingAuraFlow", model=["dit", 0], shift=3.1),
        "pos": node("QwenPixTestConditioning", seed=1, tokens=7, dim=CFG.text_dim),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=4, dim=CFG.text_dim),
        "lat": node("EmptySD3LatentImage", width=64, height=48, batch_size=1),
        "vae": node("VAELoader", vae_name=vae),
        "hint": node("QwenPixTestImage", kind="rgb", width=64, height=48, seed=4),
        "hint2": node("QwenPixTestImage", kind="rgb", width=64, height=48, seed=5),
        "mask": node("QwenPixTestMask", width=64, height=48),
        "enc": node("VAEEncode", pixels=["hint2", 0], vae=["vae", 0]),
        "cn": cn_loader(CNET),
        "cn_inpaint": cn_loader(INPAINT),
        "apply": node("ControlNetApplyAdvanced", positive=["pos", 0], negative=["neg", 0], control_net=["cn", 0],
                      image=["hint", 0], strength=0.8, start_percent=0.0, end_percent=1.0, vae=["vae", 0]),
        "apply2": node("ControlNetApplyAdvanced", positive=["apply", 0], negative=["apply", 1], control_net=["cn", 0],
                       image=["hint2", 0], strength=0.5, start_percent=0.3, end_percent=0.8, vae=["vae", 0]),
        "alimama": node("ControlNetInpaintingAliMamaApply", positive=["pos", 0], negative=["neg", 0],
                        control_net=["cn_inpaint", 0], vae=["vae", 0], image=["hint2", 0], mask=["mask", 0],
                        strength=0.9, start_percent=0.0, end_percent=1.0),
        "masked": node("SetLatentNoiseMask", samples=["enc", 0], mask=["mask", 0]),
        "zero": node("SolidMask", value=0.0, width=64, height=48),
        "one": node("SolidMask", value=1.0, width=64, height=48),
        "small": node("SolidMask", value=1.0, width=32, height=24),  # the latent's aspect, half the size
        "square": node("SolidMask", value=1.0, width=32, height=32),  # another aspect ratio
        "empty_masked": node("SetLatentNoiseMask", samples=["enc", 0], mask=["zero", 0]),
        "full_masked": node("SetLatentNoiseMask", samples=["enc", 0], mask=["one", 0]),
        "small_masked": node("SetLatentNoiseMask", samples=["enc", 0], mask=["small", 0]),
        "square_masked": node("SetLatentNoiseMask", samples=["enc", 0], mask=["square", 0]),
    }  # fmt: skip


# case: (our sampler's inputs, KSampler's inputs are the same)
PAIRS = {
    "one_controlnet": dict(pos="apply", neg="apply", neg_slot=1),
    "two_controlnets": dict(pos="apply2", neg="apply2", neg_slot=1, steps=4),
    "inpaint_controlnet_noise_mask": dict(pos="alimama", neg="alimama", neg_slot=1, lat="masked", denoise=0.8),
    "square_mask": dict(lat="square_masked", denoise=0.8),  # stretched as KSampler stretches it
}
ALONE = {  # our sampler only (its noise mask = KSampler's is test_e2e_sampler_node's)
    "plain": dict(),
    "noise_mask_ours": dict(lat="masked", denoise=0.8),
    "small_mask": dict(lat="small_masked", denoise=0.8),
    "img2img": dict(lat="enc", denoise=0.8),
    "empty_mask": dict(lat="empty_masked", denoise=0.8),
    "full_mask": dict(lat="full_masked", denoise=0.8),
}


@pytest.fixture(scope="module")
def runs(server):
    comfy, vae = server
    graph = base(vae)
    for name, kw in PAIRS.items():
        add_case(graph, f"{name}_ours", {"s": ours(**kw)})
        add_case(graph, f"{name}_ks", {"k": ks(**kw)})
    for name, kw in ALONE.items():
        add_case(graph, name, {"s": ours(**kw)})
    add_case(graph, "input", {"e": node("VAEEncode", pixels=["hint2", 0], vae=["vae", 0])})
    res = run(comfy, graph)
    return comfy, res


@pytest.mark.parametrize("case", list(PAIRS))
def test_our_sampler_honours_control_and_masks_as_ksampler(runs, case):
    comfy, _ = runs
    d = same(comfy, f"{case}_ours", f"{case}_ks")
    print(f"\n{case}: our sampler vs KSampler max diff {d:.3g}")


@pytest.mark.parametrize(("case", "without"), [("one_controlnet_ours", "plain"), ("two_controlnets_ours", "plain"),
                                              ("one_controlnet_ours", "two_controlnets_ours"),
                                              ("inpaint_controlnet_noise_mask_ours", "noise_mask_ours"),
                                              ("noise_mask_ours", "img2img")])  # fmt: skip
def test_the_control_acts(runs, case, without):
    differs(runs[0], case, without)


def test_empty_mask_keeps_the_latent_and_full_mask_equals_no_mask(runs):
    comfy, _ = runs
    kept = float(np.abs(load(comfy, "empty_mask") - load(comfy, "input")).max())
    full = float(np.abs(load(comfy, "full_mask") - load(comfy, "img2img")).max())
    print(f"\nempty mask vs the input latent: max diff {kept:.3g}; full mask vs no mask: {full:.3g}")
    assert kept <= 1e-6  # ComfyUI's latent format in and out (process_latent_in / _out) rounds in float32
    assert full == 0.0


def test_a_mask_of_another_aspect_is_stretched_with_a_warning(runs):
    _, res = runs
    messages = [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]
    assert any("the noise mask is 32x32, the latent 64x48 pixels: it is stretched" in m for m in messages), messages
    assert not any("32x24" in m for m in messages), messages  # the same aspect: no warning


def test_a_mask_batch_that_fits_neither_is_refused(server, client):
    comfy, vae = server
    graph = base(vae)
    graph.update({
        "three": node("QwenPixTestImage", kind="batch3", width=64, height=48, seed=6),
        "masks3": node("ImageToMask", image=["three", 0], channel="red"),
        "masked3": node("SetLatentNoiseMask", samples=["enc", 0], mask=["masks3", 0]),
        "s": ours(lat="masked3", denoise=0.8),
        "out": node("QwenPixTestDumpLatent", samples=["s", 0], name="masked3"),
    })  # fmt: skip
    fails(client, graph, "s", "latent_image", "noise mask has a batch of 3; the latent has 1", "Fix:")


@pytest.mark.parametrize("name", list(FOREIGN))
def test_a_controlnet_of_another_model_is_refused_by_our_loader(server, client, name):
    _, what = FOREIGN[name]
    prompt = {"x": cn_loader(name), "out": node("QwenPixTestSink", value=["x", 0])}
    fails(client, prompt, "x", f"control_net_name '{name}'", what, "Fix:")
