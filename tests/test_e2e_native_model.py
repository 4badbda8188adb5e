"""The QwenPix DiT as a native ComfyUI MODEL, through the real server: native nodes drive it with ComfyUI's own
code, and each graph gives what it gives on ComfyUI's own Qwen-Image model (UNETLoader) from the same file and
seed: output latents within 1e-4 (relative to their scale; float32, CPU).

ComfyUI fixes the Qwen-Image DiT's widths, so the shared file is one full-width block, stored in float32 (neither
side then spends the test's time casting weights). Our loader runs with the "ComfyUI native" positions, which
reproduce the native model; the official positions are compared where they differ. Every graph of a group is
one prompt (ComfyUI runs the shared nodes once); each case is its own test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from native_graphs import JOINT_DIM, TOL, close, common, cond, differs, ksampler, load, models, node, run, twin
from tools.checkpoints import dit as D

pytestmark = pytest.mark.e2e
WIDE = "qp_native_wide_f32.safetensors"
WIDE_B = "qp_native_wide_b_bf16.safetensors"
SAMPLERS = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)  # fmt: skip  (ComfyUI 0.3.75's KSampler.SAMPLERS; test_lists_are_comfyuis checks it)
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")  # fmt: skip


@pytest.fixture(scope="module")
def files(comfy):
    d = comfy.models_dir / "diffusion_models"
    D.write_comfy(d / WIDE, D.config(num_layers=1), dtype=torch.float32)
    D.write_comfy(d / WIDE_B, D.config(num_layers=1), dtype=torch.bfloat16, seed=1)  # a second model to merge in
    return comfy


# ---------------------------------------------------------------------------------------------------------
# KSampler: every sampler, every scheduler
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ksampler_matrix(files):
    # prompts of one length: ComfyUI batches cond and uncond into one forward on both sides, half the forwards
    # (prompts of different lengths, which ComfyUI runs apart, are in the other groups and the LoRA tests)
    graph = {**models(WIDE), **common(), "neg": cond(2, 9)}
    for s in SAMPLERS:
        twin(graph, f"ks_{s}", lambda side, s=s: {"k": ksampler(f"{side}_ms", sampler=s)})
    for sch in SCHEDULERS:
        twin(graph, f"sch_{sch}", lambda side, sch=sch: {"k": ksampler(f"{side}_ms", scheduler=sch)})
    run(files, graph)
    return files


def test_lists_are_comfyuis(client):
    info = client.object_info()["KSampler"]["input"]["required"]
    assert tuple(info["sampler_name"][0]) == SAMPLERS and tuple(info["scheduler"][0]) == SCHEDULERS


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_ksampler_every_sampler(ksampler_matrix, sampler):
    assert close(ksampler_matrix, f"ks_{sampler}") <= TOL


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_ksampler_every_scheduler(ksampler_matrix, scheduler):
    assert close(ksampler_matrix, f"sch_{scheduler}") <= TOL


# ---------------------------------------------------------------------------------------------------------
# Advanced samplers, guiders, model patches, conditioning and latent nodes
# ---------------------------------------------------------------------------------------------------------


def _advanced(side):
    """KSamplerAdvanced in two stages: steps 0-2 of 4 with leftover noise, then 2-4 without adding noise."""
    common_inputs = dict(noise_seed=5, steps=4, cfg=4.0, sampler_name="euler", scheduler="simple",
                         positive=["pos", 0], negative=["neg", 0])  # fmt: skip
    return {
        "a": node("KSamplerAdvanced", model=[f"{side}_ms", 0], add_noise="enable", latent_image=["lat", 0],
                  start_at_step=0, end_at_step=2, return_with_leftover_noise="enable", **common_inputs),
        "b": node("KSamplerAdvanced", model=[f"{side}_ms", 0], add_noise="disable", latent_image=["a", 0],
                  start_at_step=2, end_at_step=10000, return_with_leftover_noise="disable", **common_inputs),
    }  # fmt: skip


def _custom(side):
    """SamplerCustomAdvanced: RandomNoise + CFGGuider on the high sigmas, then DisableNoise + BasicGuider on the
    low ones (SplitSigmas), the first of which is moved by SetFirstSigma."""
    return {
        "sig": node("BasicScheduler", model=[f"{side}_ms", 0], scheduler="simple", steps=4, denoise=1.0),
        "split": node("SplitSigmas", sigmas=["sig", 0], step=2),
        "low": node("SetFirstSigma", sigmas=["split", 1], sigma=0.45),
        "sel": node("KSamplerSelect", sampler_name="dpmpp_2m"),
        "noise": node("RandomNoise", noise_seed=9),
        "cfg": node("CFGGuider", model=[f"{side}_ms", 0], positive=["pos", 0], negative=["neg", 0], cfg=3.5),
        "s1": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["cfg", 0], sampler=["sel", 0],
                   sigmas=["split", 0], latent_image=["lat", 0]),
        "off": node("DisableNoise"),
        "basic": node("BasicGuider", model=[f"{side}_ms", 0], conditioning=["pos", 0]),
        "s2": node("SamplerCustomAdvanced", noise=["off", 0], guider=["basic", 0], sampler=["sel", 0],
                   sigmas=["low", 0], latent_image=["s1", 0]),
    }  # fmt: skip


def _with_model_patch(patch_class, **patch_inputs):
    def build(side):
        return {"m": node(patch_class, model=[f"{side}_ms", 0], **patch_inputs), "k": ksampler("m", steps=6)}

    return build


def _conditioning(build_cond):
    def build(side):
        nodes = build_cond()
        last = list(nodes)[-1]
        return {**nodes, "k": ksampler(f"{side}_ms", pos=last)}

    return build


def _references(method):
    """Two references of different sizes (ReferenceLatent twice), laid out by `method` (None: the default)."""

    def build():
        nodes = {
            "r1": node("ReferenceLatent", conditioning=["pos", 0], latent=["ref_a", 0]),
            "r2": node("ReferenceLatent", conditioning=["r1", 0], latent=["ref_b", 0]),
        }
        if method:
            nodes["m"] = node("FluxKontextMultiReferenceLatentMethod", conditioning=["r2", 0],
                              reference_latents_method=method)  # fmt: skip
        return nodes

    return build


def _noise_mask(side):
    return {
        "masked": node("SetLatentNoiseMask", samples=["img", 0], mask=["mask", 0]),
        "k": ksampler(f"{side}_ms", lat="masked", denoise=0.7, steps=3),
    }


ADVANCED = {
    "ksampler_advanced": _advanced,
    "sampler_custom_advanced": _custom,
    "cfgnorm_1": _with_model_patch("CFGNorm", strength=1.0),
    "cfgnorm_0.6": _with_model_patch("CFGNorm", strength=0.6),
    "easycache": _with_model_patch(
        "EasyCache", reuse_threshold=0.5, start_percent=0.1, end_percent=0.95, verbose=False
    ),  # fmt: skip
    "lazycache": _with_model_patch(
        "LazyCache", reuse_threshold=0.5, start_percent=0.1, end_percent=0.95, verbose=False
    ),  # fmt: skip
    "zero_out_negative": lambda side: {
        "z": node("ConditioningZeroOut", conditioning=["neg", 0]),
        "k": ksampler(f"{side}_ms", neg="z"),
    },
    "combine": _conditioning(
        lambda: {"c": node("ConditioningCombine", conditioning_1=["pos", 0], conditioning_2=["pos2", 0])}
    ),  # fmt: skip
    "timestep_range": _conditioning(
        lambda: {
            "a": node("ConditioningSetTimestepRange", conditioning=["pos", 0], start=0.0, end=0.5),
            "b": node("ConditioningSetTimestepRange", conditioning=["pos2", 0], start=0.5, end=1.0),
            "c": node("ConditioningCombine", conditioning_1=["a", 0], conditioning_2=["b", 0]),
        }
    ),  # fmt: skip
    "reference_default": _conditioning(_references(None)),
    "reference_index": _conditioning(_references("index")),
    "reference_offset": _conditioning(_references("offset")),
    "reference_uxo": _conditioning(_references("uxo")),
    "native_text_encode": lambda side: {
        "p": node("CLIPTextEncode", clip=["clip", 0], text="a red boat on a calm lake"),
        "n": node("CLIPTextEncode", clip=["clip", 0], text=" "),
        "k": ksampler(f"{side}_ms", pos="p", neg="n"),
    },
    "set_latent_noise_mask": _noise_mask,
    "cfg_below_1": lambda side: {"k": ksampler(f"{side}_ms", cfg=0.6)},
    "skip_layer_guidance": _with_model_patch(
        "SkipLayerGuidanceDiT",
        double_layers="0",
        single_layers="",
        scale=3.0,
        start_percent=0.0,
        end_percent=1.0,
        rescaling_scale=0.0,
    ),  # fmt: skip
    "model_merge": lambda side: {
        "b": node("QwenPixDiTLoader", dit_name=WIDE_B, compute_dtype="fp32", positions="ComfyUI native")
        if side == "o"
        else node("UNETLoader", unet_name=WIDE_B, weight_dtype="default"),
        "m": node("ModelMergeSimple", model1=[f"{side}_ms", 0], model2=["b", 0], ratio=0.3),
        "k": ksampler("m"),
    },
}


@pytest.fixture(scope="module")
def advanced(files):
    graph = {**models(WIDE), **common(), "pos2": cond(3, 6), "clip": node("QwenPixTestFakeClip", dim=JOINT_DIM),
             "ref_a": node("QwenPixTestLatent", seed=21, width=48, height=32),
             "ref_b": node("QwenPixTestLatent", seed=22, width=32, height=64),
             "img": node("QwenPixTestLatent", seed=23, width=64, height=64),
             "mask": node("QwenPixTestMask", width=64, height=64)}  # fmt: skip
    for name, build in ADVANCED.items():
        twin(graph, name, build)
    # controls: what the cases must differ from (the same graph without the node under test)
    twin(graph, "plain6", lambda side: {"k": ksampler(f"{side}_ms", steps=6)})
    twin(graph, "plain3", lambda side: {"k": ksampler(f"{side}_ms", steps=3)})
    run(files, graph)
    return files


@pytest.mark.parametrize("case", list(ADVANCED))
def test_native_nodes_match(advanced, case):
    assert close(advanced, case) <= TOL


@pytest.mark.parametrize(
    "case, control",
    [
        ("cfgnorm_0.6", "cfgnorm_1"),
        ("easycache", "plain6"),
        ("lazycache", "plain6"),
        ("zero_out_negative", "ks_euler"),
        ("combine", "ks_euler"),
        ("timestep_range", "combine"),
        ("reference_index", "ks_euler"),
        ("reference_offset", "reference_index"),
        ("set_latent_noise_mask", "plain3"),
        ("cfg_below_1", "ks_euler"),
        ("skip_layer_guidance", "plain6"),
        ("model_merge", "ks_euler"),
    ],
)
def test_the_node_changes_the_result(advanced, ksampler_matrix, case, control):
    """Each node does something on our MODEL (it is not connected and silently ignored)."""
    differs(advanced, f"{case}_o", f"{control}_o")


def test_noise_mask_keeps_the_unmasked_half(advanced):
    """SetLatentNoiseMask: outside the mask the input latent comes back unchanged (ComfyUI's masked sampling)."""
    out = load(advanced, "set_latent_noise_mask_o")
    g = torch.Generator().manual_seed(23)
    source = torch.randn(1, 16, 1, 8, 8, generator=g).numpy()
    assert np.abs(out[..., 4:] - source[..., 4:]).max() <= 1e-5
    assert np.abs(out[..., :4] - source[..., :4]).max() > 1e-2
