"""ControlNets on the native MODEL, through the real server: ComfyUI's own InstantX Qwen-Image ControlNet
(ControlNetLoader + ControlNetApplyAdvanced, one and two stacked, with strengths and start/end percentages; the
InstantX Inpainting ControlNet through ControlNetInpaintingAliMamaApply)
computes its residuals and our MODEL adds them after each block as ComfyUI's model does: the same latents as on
ComfyUI's own Qwen-Image model from the same files (bit for bit with the "ComfyUI native" positions)."""

from __future__ import annotations

import pytest
import torch

from native_graphs import close, common, differs, ksampler, models, node, run, twin
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D

pytestmark = pytest.mark.e2e
DIT, CNET = "qp_cnet_wide_f32.safetensors", "qp_cnet_instantx_bf16.safetensors"
INPAINT = "qp_cnet_instantx_inpaint_bf16.safetensors"  # InstantX Inpainting layout (4 extra control channels)
PLANS: dict[str, list[str]] = {}  # node id -> the plan lines a loader showed


@pytest.fixture(scope="module")
def runs(comfy, tiny_comfy_vae):
    cfg = D.config(num_layers=1)
    D.write_comfy(comfy.models_dir / "diffusion_models" / DIT, cfg, dtype=torch.float32, seed=5)
    C.write_instantx(comfy.models_dir / "controlnet" / CNET, cfg, seed=6)
    C.write_instantx(comfy.models_dir / "controlnet" / INPAINT, cfg, seed=7, extra_channels=4)
    graph = {
        **common(), **models(DIT),
        "cn": node("ControlNetLoader", control_net_name=CNET),
        "vae": node("VAELoader", vae_name=tiny_comfy_vae),
        "hint": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=4),
        "hint2": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=5),
        "apply": node("ControlNetApplyAdvanced", positive=["pos", 0], negative=["neg", 0], control_net=["cn", 0],
                      image=["hint", 0], strength=0.8, start_percent=0.0, end_percent=1.0, vae=["vae", 0]),
        "apply2": node("ControlNetApplyAdvanced", positive=["apply", 0], negative=["apply", 1], control_net=["cn", 0],
                       image=["hint2", 0], strength=0.5, start_percent=0.3, end_percent=0.8, vae=["vae", 0]),
        "cn_inpaint": node("ControlNetLoader", control_net_name=INPAINT),
        "noise_img": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=9),
        "mask": node("ThresholdMask", mask=["mask_graded", 0], value=0.5),
        "mask_graded": node("ImageToMask", image=["noise_img", 0], channel="green"),
        "alimama": node("ControlNetInpaintingAliMamaApply", positive=["pos", 0], negative=["neg", 0],
                        control_net=["cn_inpaint", 0], vae=["vae", 0], image=["hint", 0], mask=["mask", 0],
                        strength=0.9, start_percent=0.0, end_percent=1.0),
    }  # fmt: skip
    twin(graph, "inpaint_controlnet", lambda side: {"k": ksampler(f"{side}_ms", pos="alimama", neg="alimama", steps=3)})
    for side in ("o", "n"):
        graph[f"inpaint_controlnet_{side}_k"]["inputs"]["negative"] = ["alimama", 1]
    graph.update({  # the pack's ControlNet loader feeding ComfyUI's apply nodes, on ComfyUI's own model
        "qcn": node("QwenPixControlNetLoader", control_net_name=CNET, compute_dtype="fp32", positions="ComfyUI native"),
        "qcn_inpaint": node("QwenPixControlNetLoader", control_net_name=INPAINT, compute_dtype="fp32",
                            positions="ComfyUI native"),
        "qapply": {**graph["apply"], "inputs": {**graph["apply"]["inputs"], "control_net": ["qcn", 0]}},
        "qalimama": {**graph["alimama"], "inputs": {**graph["alimama"]["inputs"], "control_net": ["qcn_inpaint", 0]}},
    })  # fmt: skip
    for case, ours, theirs in (("our_loader", "qapply", "apply"), ("our_inpaint_loader", "qalimama", "alimama")):
        twin(graph, case, lambda side, o=ours, t=theirs: {
            "k": ksampler("n_ms", pos=o if side == "o" else t, neg=o if side == "o" else t, steps=3)})  # fmt: skip
        for side, src in (("o", ours), ("n", theirs)):
            graph[f"{case}_{side}_k"]["inputs"]["negative"] = [src, 1]
    twin(graph, "one_controlnet", lambda side: {"k": ksampler(f"{side}_ms", pos="apply", neg="apply", steps=3)})
    for side in ("o", "n"):  # (the negative output of ControlNetApplyAdvanced is slot 1)
        graph[f"one_controlnet_{side}_k"]["inputs"]["negative"] = ["apply", 1]
    twin(graph, "two_controlnets", lambda side: {"k": ksampler(f"{side}_ms", pos="apply2", neg="apply2", steps=3)})
    for side in ("o", "n"):
        graph[f"two_controlnets_{side}_k"]["inputs"]["negative"] = ["apply2", 1]
    twin(graph, "no_controlnet", lambda side: {"k": ksampler(f"{side}_ms", steps=3)})
    res = run(comfy, graph)
    comfy_plans = {e["data"]["node"]: e["data"]["output"]["qwenpix_plan"] for e in res.events
                   if e["type"] == "executed" and "qwenpix_plan" in (e["data"].get("output") or {})}  # fmt: skip
    PLANS.update(comfy_plans)
    return comfy


@pytest.mark.parametrize("case", ["our_loader", "our_inpaint_loader"])
def test_our_loader_matches_comfyuis_loader(runs, case):
    assert close(runs, case) <= 1e-4


@pytest.mark.parametrize("case", ["one_controlnet", "two_controlnets", "inpaint_controlnet"])
def test_controlnets_match_comfyuis_model(runs, case):
    assert close(runs, case) == 0.0
    differs(runs, f"{case}_o", "no_controlnet_o")


def test_our_loader_shows_the_controlnets_placement(runs):
    assert PLANS["qcn"][0].startswith("InstantX union ControlNet: 1 blocks, bfloat16; "), PLANS
    assert PLANS["qcn_inpaint"][0].startswith("InstantX inpaint ControlNet: 1 blocks, bfloat16; "), PLANS
    assert "resident" in PLANS["qcn"][0]
