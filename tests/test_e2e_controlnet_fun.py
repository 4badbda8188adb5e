"""The Fun ControlNet Union (2512) through the real server: "Load Qwen-Image ControlNet" reads the Fun file and
ComfyUI's own ControlNetApplyAdvanced drives it on the QwenPix MODEL (KSampler, tiny files; ComfyUI 0.3.75 has
no Fun loader of its own to compare with). By construction: a Fun file with zero output projections gives the
plain model's latent exactly; a random one changes it, alone and chained with an InstantX
ControlNet (ComfyUI's previous_controlnet merge, None entries kept); the loader shows the branch's plan."""

from __future__ import annotations

import pytest
import torch

from native_graphs import differs, node, run, same
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D

pytestmark = pytest.mark.e2e
CFG = D.tiny_config(num_layers=3)
FUN = C.fun_config(CFG, num_blocks=2, injection_layers=(0, 2))
DIT, FUN_FILE, FUN_ZERO = "qp_fun_dit_tiny.safetensors", "qp_fun_cnet_bf16.safetensors", "qp_fun_cnet_zero.safetensors"
INSTANTX = "qp_fun_instantx_tiny.safetensors"
PLANS: dict[str, list[str]] = {}


def sample(case: str, pos: str, neg: str, model: str = "ms") -> dict:
    return {
        f"{case}_k": node("KSampler", model=[model, 0], seed=5, steps=2, cfg=4.0, sampler_name="euler",
                          scheduler="simple", positive=[pos, 0], negative=[neg, 1 if neg != "neg" else 0],
                          latent_image=["lat", 0], denoise=1.0),
        f"{case}_dump": node("QwenPixTestDumpLatent", samples=[f"{case}_k", 0], name=case),
    }  # fmt: skip


def apply(net: str, strength: float, pos="pos", neg="neg", start=0.0, end=1.0, hint="hint") -> dict:
    return node("ControlNetApplyAdvanced", positive=[pos, 0], negative=[neg, 0 if neg == "neg" else 1],
                control_net=[net, 0], image=[hint, 0], strength=strength, start_percent=start, end_percent=end,
                vae=["vae", 0])  # fmt: skip


@pytest.fixture(scope="module")
def runs(comfy, tiny_comfy_vae):
    D.write_comfy(comfy.models_dir / "diffusion_models" / DIT, CFG, dtype=torch.float32, seed=5)
    C.write_fun(comfy.models_dir / "controlnet" / FUN_FILE, FUN, seed=6)
    C.write_fun(comfy.models_dir / "controlnet" / FUN_ZERO, FUN, seed=7, zero_after=True)
    C.write_instantx(comfy.models_dir / "controlnet" / INSTANTX, D.tiny_config(num_layers=1), seed=8)

    def loader(name):
        return node("QwenPixControlNetLoader", control_net_name=name, compute_dtype="fp32", positions="ComfyUI native")

    graph = {
        "dit": node("QwenPixDiTLoader", dit_name=DIT, compute_dtype="fp32", positions="ComfyUI native"),
        "ms": node("ModelSamplingAuraFlow", model=["dit", 0], shift=3.1),
        "pos": node("QwenPixTestConditioning", seed=1, tokens=7, dim=CFG.text_dim),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=3, dim=CFG.text_dim),
        "lat": node("EmptySD3LatentImage", width=64, height=64, batch_size=1),
        "vae": node("VAELoader", vae_name=tiny_comfy_vae),
        "hint": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=4),
        "hint2": node("QwenPixTestImage", kind="rgb", width=64, height=64, seed=5),
        "fun": loader(FUN_FILE), "fun0": loader(FUN_ZERO), "ix": loader(INSTANTX),
        "a_fun": apply("fun", 0.8), "a_zero": apply("fun0", 1.0),
        "a_mixed": apply("ix", 0.7, pos="a_fun", neg="a_fun", hint="hint2"),
        **sample("plain", "pos", "neg"), **sample("fun", "a_fun", "a_fun"), **sample("zero", "a_zero", "a_zero"),
        **sample("mixed", "a_mixed", "a_mixed"),
        # the official positions: cond (7 tokens) and uncond (3) in one zero-padded pass, the lengths to the branch
        "dit_off": node("QwenPixDiTLoader", dit_name=DIT, compute_dtype="fp32", positions="official (diffusers)"),
        "ms_off": node("ModelSamplingAuraFlow", model=["dit_off", 0], shift=3.1),
        "fun_off": node("QwenPixControlNetLoader", control_net_name=FUN_FILE, compute_dtype="fp32",
                        positions="official (diffusers)"),
        "a_official": apply("fun_off", 0.8),
        **sample("official", "a_official", "a_official", model="ms_off"),
        **sample("official_plain", "pos", "neg", model="ms_off"),
    }  # fmt: skip
    res = run(comfy, graph)
    PLANS.update({e["data"]["node"]: e["data"]["output"]["qwenpix_plan"] for e in res.events
                  if e["type"] == "executed" and "qwenpix_plan" in (e["data"].get("output") or {})})  # fmt: skip
    return comfy


def test_zero_output_projections_give_the_plain_model_exactly(runs):
    assert same(runs, "zero", "plain") == 0.0


def test_the_fun_controlnet_acts_alone_and_chained_with_instantx(runs):
    differs(runs, "fun", "plain")
    differs(runs, "official", "official_plain")
    differs(runs, "mixed", "fun")


def test_the_loader_shows_the_fun_plan(runs):
    line = PLANS["fun"][0]
    assert line.startswith("Fun ControlNet Union: 2 blocks, hints after DiT blocks 0, 2, bfloat16; "), line
    assert "control images only" in line
    assert PLANS["ix"][0].startswith("InstantX union ControlNet"), PLANS["ix"]
