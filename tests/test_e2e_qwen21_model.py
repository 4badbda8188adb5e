"""The Qwen-Image-2.1 DiT as a ComfyUI MODEL through a real ComfyUI server (issue 17): the 2.1 loader's MODEL
and Encode's positive / negative drive KSampler, SamplerCustomAdvanced (with CFGGuider and the exact-sigmas
node) and LoraLoaderModelOnly; each latent equals our own 2.1 Sampler's or the core's on the same tiny files,
for text-to-image and an edit with 2 references. v1 / 2.1 mixes are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_e2e_qwen21 import test_image, write_models21

from graphs import fails
from native_graphs import node
from qwen_image_core.qwen21 import QwenImage21Pipeline
from qwen_image_core.qwen21.pipeline import prepare_references
from qwen_image_core.qwen21.schedule import mu, sigmas, target_tokens

pytestmark = pytest.mark.e2e

DIT, V1_DIT = "qwen_image_2.1_model_e2e.safetensors", "qwen_image_v1_for_21_model_e2e.safetensors"
TE, VAE = "qwen_3_vl_model_e2e.safetensors", "qwen_image_2.1_vae_model_e2e.safetensors"
LORA = "qwen_image_2.1_lora_model_e2e.safetensors"
TOL = 1e-5  # max |graph - reference| over the latent (float32 noise; the latents are ~1)
PROMPT, NEGATIVE, EDIT_PROMPT = "a red fox in the snow", "blurry", "put the cat of <image2> into <image1>"
REFS = (("rgb", 270, 250, 11), ("rgba", 250, 262, 12))  # (kind, width, height, seed): not multiples of 32
STEPS, CFG, SEED, W, H = 2, 2.0, 7, 64, 96
LORA_KEYS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.gate_up")


@pytest.fixture(scope="module")
def models21(comfy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen21_model_e2e")
    return write_models21(comfy.models_dir, tmp, (DIT, V1_DIT, TE, VAE), dit_dtype=torch.float32)


def graph(prompt=PROMPT, refs=(), lora=None):
    """Our 2.1 Sampler, KSampler (simple) on Model Sampling's MODEL, SamplerCustomAdvanced on the exact sigmas:
    latents dumped as s21, ks, sca; lora: (file for LoraLoaderModelOnly, file for Qwen-Image-2.1 LoRA)."""
    model = ["dit", 1]
    g = {
        "dit": node("QwenPix21DiTLoader", dit_name=DIT, compute_dtype="fp32"),
        "te": node("QwenPix21TextEncoderLoader", text_encoder_name=TE),
        "vae": node("QwenPix21VAELoader", vae_name=VAE),
        "enc": node("QwenPix21Encode", text_encoder=["te", 0], vae=["vae", 0], prompt=prompt,
                    negative_prompt=NEGATIVE, width=W, height=H, resize="pad", resolution=1024, rgba=False),
        "s21": node("QwenPix21Sampler", dit=["dit", 0], conditioning=["enc", 0], latent=["enc", 1], seed=SEED,
                    steps=STEPS, cfg=CFG, schedule="dynamic"),
        "ms": node("QwenPix21ModelSampling", model=model, latent=["enc", 1]),
        "ks": node("KSampler", model=["ms", 0], seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                   scheduler="simple", positive=["enc", 2], negative=["enc", 3], latent_image=["enc", 1], denoise=1.0),
        "sig": node("QwenPix21Sigmas", latent=["enc", 1], steps=STEPS, schedule="dynamic"),
        "guide": node("CFGGuider", model=model, positive=["enc", 2], negative=["enc", 3], cfg=CFG),
        "noise": node("RandomNoise", noise_seed=SEED),
        "euler": node("KSamplerSelect", sampler_name="euler"),
        "sca": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guide", 0], sampler=["euler", 0],
                    sigmas=["sig", 0], latent_image=["enc", 1]),
    }  # fmt: skip
    if lora is not None:  # LoraLoaderModelOnly before ks and sca; Qwen-Image-2.1 LoRA before sca_b
        g["lora"] = node("LoraLoaderModelOnly", model=model, lora_name=lora[0], strength_model=0.5)
        g["ms"]["inputs"]["model"] = g["guide"]["inputs"]["model"] = ["lora", 0]
        g["lora_b"] = node("QwenPix21LoRA", model=model, lora_name=lora[1], strength=0.5)
        g["guide_b"] = {**g["guide"], "inputs": {**g["guide"]["inputs"], "model": ["lora_b", 0]}}
        g["sca_b"] = {**g["sca"], "inputs": {**g["sca"]["inputs"], "guider": ["guide_b", 0]}}
        del g["s21"]
    for i, (kind, w, h, s) in enumerate(refs, 1):
        g[f"img{i}"] = node("QwenPixTestImage", kind=kind, width=w, height=h, seed=s)
        g["enc"]["inputs"][f"image{i}"] = [f"img{i}", 0]
    for name in ("s21", "ks", "sca", "sca_b"):
        if name in g:
            g[f"dump_{name}"] = node("QwenPixTestDumpLatent", samples=[name, 0], name=f"q21m_{name}")
    return g


def run(comfy, client, prompt) -> tuple[dict, list[str]]:
    res = client.run(prompt, timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")
    said = [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]
    names = [k.removeprefix("dump_") for k in prompt if k.startswith("dump_")]
    return {n: np.load(comfy.output_dir / f"q21m_{n}.npy") for n in names}, said


def simple_sigmas(tokens: int, steps: int) -> torch.Tensor:
    """ComfyUI's `simple` schedule on ModelSampling21: 1 - i/N through the shift e^mu, no terminal stretch."""
    t = 1 - torch.arange(steps, dtype=torch.float32) / steps
    shift = math.exp(mu(tokens))
    return torch.cat([shift * t / (1 + (shift - 1) * t), torch.zeros(1)])


def core_sampler(p: QwenImage21Pipeline, prompt=PROMPT, refs=()):
    """sig_fn -> the core's latent for the graph's inputs (as QwenImage21Pipeline.generate / edit, before
    decoding); the prompts and references are encoded once."""
    images, latents, (w, h) = (), None, (W, H)
    if refs:
        prepared = prepare_references([test_image(*r) for r in refs], "pad")
        images, (w, h) = prepared.images, prepared.images[0].size
        latents = p.encode_images(images)
    cond, neg = p.encode_prompt([prompt], images), p.encode_prompt([NEGATIVE], images)
    cond.ref_latents = neg.ref_latents = latents
    noise = p.noise(1, h, w, SEED)
    return lambda sig_fn: p.sample(noise, sig_fn(target_tokens(h, w)), cond, neg, CFG)


def exact(n):
    return sigmas(STEPS, n)


def simple(n):
    return simple_sigmas(n, STEPS)


def check(name: str, got: np.ndarray, want: torch.Tensor | np.ndarray) -> None:
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.abs(got - want).max())
    print(f"\n{name}: max |graph - reference| = {err:.3g} (latent max {float(np.abs(want).max()):.3g})")
    assert err <= TOL


def test_text_to_image_ksampler_and_custom_sampler_equal_the_21_sampler(models21, comfy, client):
    """And KSampler straight on the loader's MODEL (shift for 1024², a 64x96 latent): equal to the core on that
    shift, the mismatch said."""
    prompt = graph()
    prompt["ks_raw"] = {**prompt["ks"], "inputs": {**prompt["ks"]["inputs"], "model": ["dit", 1]}}
    prompt["dump_ks_raw"] = node("QwenPixTestDumpLatent", samples=["ks_raw", 0], name="q21m_ks_raw")
    out, said = run(comfy, client, prompt)
    assert said and all("Qwen-Image-2.1 Model Sampling" in m for m in said), said  # ks_raw's only
    core = core_sampler(models21)
    check("2.1 Sampler vs core", out["s21"], core(exact))
    check("SamplerCustomAdvanced + 2.1 Sigmas vs 2.1 Sampler", out["sca"], out["s21"])
    check("KSampler simple vs core on the simple sigmas", out["ks"], core(simple))
    check("KSampler on the 1024² shift vs core", out["ks_raw"], core(lambda n: simple_sigmas(4096, STEPS)))


def test_edit_with_two_references_ksampler_and_custom_sampler_equal_the_21_sampler(models21, comfy, client):
    out, said = run(comfy, client, graph(EDIT_PROMPT, REFS))
    assert said == []  # Model Sampling set the shift for this latent; the exact sigmas: nothing to say
    assert out["s21"].shape[-2:] == (256 // 16, 288 // 16)  # image1 (270x250) padded to 288x256
    core = core_sampler(models21, EDIT_PROMPT, REFS)
    check("edit: 2.1 Sampler vs core", out["s21"], core(exact))
    check("edit: SamplerCustomAdvanced + 2.1 Sigmas vs 2.1 Sampler", out["sca"], out["s21"])
    check("edit: KSampler simple vs core on the simple sigmas", out["ks"], core(simple))


def test_loras_are_honoured_and_unknown_keys_refused(models21, comfy, client):
    """One LoRA (peft lora_A / lora_B, strength 0.5) in two files: ComfyUI's spellings (diffusion_model.<module>,
    kohya lora_unet_) through LoraLoaderModelOnly, diffusers' (transformer.<module>, bare) through Qwen-Image-2.1
    LoRA: each equals the core on the DiT with the delta merged. A key naming no module is refused by name."""
    g = torch.Generator().manual_seed(3)
    dit = models21.dit
    comfy_sd, diffusers_sd, deltas = {}, {}, {}
    for i, key in enumerate(LORA_KEYS):
        weight = dit.get_submodule(key).weight
        down, up = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g) * 0.1
        names = ((f"diffusion_model.{key}", f"transformer.{key}"), ("lora_unet_" + key.replace(".", "_"), key))[i]
        for sd, name in zip((comfy_sd, diffusers_sd), names, strict=True):
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down.clone(), up.clone()
        deltas[key] = 0.5 * up @ down
    files = ("q21m_comfy_lora.safetensors", "q21m_diffusers_lora.safetensors")
    for sd, name in zip((comfy_sd, diffusers_sd), files, strict=True):
        save_file(sd, str(comfy.models_dir / "loras" / name))
    prompt = graph(lora=files)  # + the diffusers-spelled file through LoraLoaderModelOnly: nothing maps, said
    prompt["lora_c"] = node("LoraLoaderModelOnly", model=["dit", 1], lora_name=files[1], strength_model=0.5)
    prompt["state_c"] = node("QwenPixTestModelState", model=["lora_c", 0])
    out, said = run(comfy, client, prompt)
    assert any("no key for the Qwen-Image-2.1 model" in m for m in said), said
    base = {k: dit.get_submodule(k).weight.detach().clone() for k in LORA_KEYS}
    try:
        for k in LORA_KEYS:
            dit.get_submodule(k).weight.data += deltas[k]
        core = core_sampler(models21)
        want_exact, want_simple = core(exact), core(simple)
    finally:
        for k in LORA_KEYS:
            dit.get_submodule(k).weight.data.copy_(base[k])
    check("LoraLoaderModelOnly, SamplerCustomAdvanced vs core on merged weights", out["sca"], want_exact)
    check("LoraLoaderModelOnly, KSampler vs core on merged weights", out["ks"], want_simple)
    check("Qwen-Image-2.1 LoRA (transformer. / bare keys) vs core on merged weights", out["sca_b"], want_exact)
    assert float(np.abs(want_exact.numpy() - core_sampler(models21)(exact).numpy()).max()) > 100 * TOL  # it acts
    diffusers_sd["transformer.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 8)
    save_file(diffusers_sd, str(comfy.models_dir / "loras" / "q21m_bad_lora.safetensors"))
    prompt = graph(lora=(files[0], "q21m_bad_lora.safetensors"))
    fails(client, prompt, "lora_b", "transformer.no_such_block.to_q.lora_A.weight", "name no module")


def test_v1_conditioning_on_the_21_model_is_named(models21, client):
    prompt = graph()
    prompt["v1cond"] = node("QwenPixTestConditioning", seed=1, tokens=5, dim=40)
    prompt["ks"]["inputs"]["positive"] = ["v1cond", 0]
    for k in ("s21", "dump_s21", "sca", "dump_sca"):
        del prompt[k]
    fails(client, prompt, "ks", "not from Qwen-Image-2.1 Encode")
    prompt = graph()  # the MODEL output into our 2.1 Sampler (it would bypass the MODEL's patches): named
    prompt["s21"]["inputs"]["dit"] = ["dit", 1]
    for k in ("ks", "dump_ks", "sca", "dump_sca"):
        del prompt[k]
    fails(client, prompt, "s21", "the loader's MODEL output", "'dit' output")


def test_21_conditioning_on_a_v1_model_is_named(models21, client):
    prompt = {
        "v1": node("QwenPixDiTLoader", dit_name=V1_DIT, compute_dtype="fp32", positions="official (diffusers)"),
        "te": node("QwenPix21TextEncoderLoader", text_encoder_name=TE),
        "vae": node("QwenPix21VAELoader", vae_name=VAE),
        "enc": node("QwenPix21Encode", text_encoder=["te", 0], vae=["vae", 0], prompt=PROMPT, negative_prompt="",
                    width=W, height=H, resize="pad", resolution=1024, rgba=False),
        "lat": node("EmptySD3LatentImage", width=W, height=H, batch_size=1),
        "ks": node("KSampler", model=["v1", 0], seed=SEED, steps=1, cfg=1.0, sampler_name="euler",
                   scheduler="simple", positive=["enc", 2], negative=["enc", 3], latent_image=["lat", 0], denoise=1.0),
        "dump": node("QwenPixTestDumpLatent", samples=["ks", 0], name="q21m_v1"),
    }  # fmt: skip
    fails(client, prompt, "ks", "Qwen-Image-2.1")


def test_prefix_cache_once_per_condition_and_run(models21, client):
    """KSampler, CFG 2, 3 steps: 6 diffusion-model calls (cond and uncond apart), 2 prefix caches filled per
    run (one per condition), filled again in the next run (a new seed: nothing reused across runs)."""
    fills = []
    for seed in (1, 2):
        prompt = graph()
        for k in ("s21", "dump_s21", "sca", "dump_sca", "dump_ks"):
            del prompt[k]
        prompt["count"] = node("QwenPixTestCountCalls", model=["ms", 0], name=f"q21m_calls{seed}")
        prompt["ks"]["inputs"].update(model=["count", 0], steps=3, seed=seed)
        prompt["report"] = node("QwenPixTestReportCalls", samples=["ks", 0], name=f"q21m_calls{seed}", model=["dit", 1])
        res = client.run(prompt, timeout=300)
        assert res.status == "success", (res.error() or {}).get("exception_message")
        assert res.outputs["report"]["calls"][0] == [1] * 6
        fills.append(res.outputs["report"]["prefix_fills"][0])
    print(f"\nprefix fills after each run: {fills}")
    assert fills[1] - fills[0] == 2
    # ComfyUI's model management loaded the 2.1 MODEL for those runs and still holds it, at its size
    state = {"dit": prompt["dit"], "state": node("QwenPixTestModelState", model=["dit", 1], salt=1)}
    res = client.run(state, timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")
    got = res.outputs["state"]["state"][0]
    assert got["registered"], got  # this very MODEL is among ComfyUI's loaded models
