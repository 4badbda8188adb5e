"""The Qwen-Image-2.1 DiT as a ComfyUI MODEL through a real ComfyUI server (issue 17): the 2.1 loader's MODEL
and Encode's positive / negative drive KSampler, SamplerCustomAdvanced (with CFGGuider and the exact-sigmas
node) and LoraLoaderModelOnly; each latent equals our own 2.1 Sampler's or the core's on the same tiny files,
for text-to-image and an edit with 2 references. v1 / 2.1 mixes are named."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from graphs import fails
from native_graphs import node
from oracles import TOKENIZER
from qwen_image_core.formats.vae21 import load_vae21
from qwen_image_core.qwen21 import QwenImage21Pipeline, load_dit21, load_qwen3_vl
from qwen_image_core.qwen21.pipeline import prepare_references
from qwen_image_core.qwen21.schedule import mu, sigmas, target_tokens
from tools.checkpoints import dit as WD1
from tools.checkpoints import dit21 as WD
from tools.checkpoints import qwen3_vl as WQ
from tools.checkpoints import vae21 as WV

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
    te = WQ.reference_model(seed=0)
    WQ.write_single(comfy.models_dir / "text_encoders" / TE, te)
    cfg = WD.tiny_config(text_dim=te.config.text_config.hidden_size)
    WD.write_comfy(comfy.models_dir / "diffusion_models" / DIT, cfg, dtype=torch.float32)
    WD1.write_comfy(comfy.models_dir / "diffusion_models" / V1_DIT, WD1.tiny_config())
    shutil.copyfile(WV.write_vae21(tmp, "single"), comfy.models_dir / "vae" / VAE)
    dit = load_dit21(comfy.models_dir / "diffusion_models" / DIT)
    encoder = load_qwen3_vl(comfy.models_dir / "text_encoders" / TE, tokenizer=TOKENIZER)
    vae = load_vae21(comfy.models_dir / "vae" / VAE)
    return QwenImage21Pipeline(dit, vae, encoder)


def test_image(kind, width, height, seed) -> torch.Tensor:
    """QwenPixTestImage's picture [H, W, C], regenerated here."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, height, width, 4 if kind == "rgba" else 3, generator=g)[0]


test_image.__test__ = False  # a helper, not a test


def graph(prompt=PROMPT, refs=(), lora=None):
    """Our 2.1 Sampler, KSampler (simple) on Model Sampling's MODEL, SamplerCustomAdvanced on the exact sigmas:
    latents dumped as s21, ks, sca."""
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
    if lora is not None:
        g["lora"] = node("LoraLoaderModelOnly", model=model, lora_name=lora, strength_model=0.5)
        g["ms"]["inputs"]["model"] = g["guide"]["inputs"]["model"] = ["lora", 0]
        del g["s21"]
    for i, (kind, w, h, s) in enumerate(refs, 1):
        g[f"img{i}"] = node("QwenPixTestImage", kind=kind, width=w, height=h, seed=s)
        g["enc"]["inputs"][f"image{i}"] = [f"img{i}", 0]
    for name in ("s21", "ks", "sca"):
        if name in g:
            g[f"dump_{name}"] = node("QwenPixTestDumpLatent", samples=[name, 0], name=f"q21m_{name}")
    return g


def run(comfy, client, prompt) -> tuple[dict, list[str]]:
    res = client.run(prompt, timeout=300)
    assert res.status == "success", (res.error() or {}).get("exception_message")
    said = [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]
    names = [n for n in ("s21", "ks", "sca") if n in prompt]
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


@pytest.mark.parametrize("refs", [(), REFS], ids=["t2i", "edit_2_refs"])
def test_ksampler_and_custom_sampler_equal_the_21_sampler(models21, comfy, client, refs):
    prompt = EDIT_PROMPT if refs else PROMPT
    out, said = run(comfy, client, graph(prompt, refs))
    assert said == []  # Model Sampling set the shift for this latent; the exact sigmas: nothing to say
    core = core_sampler(models21, prompt, refs)
    check("2.1 Sampler vs core", out["s21"], core(exact))
    check("SamplerCustomAdvanced + 2.1 Sigmas vs 2.1 Sampler", out["sca"], out["s21"])
    check("KSampler simple vs core on the simple sigmas", out["ks"], core(simple))


def test_lora_loader_model_only_is_honoured(models21, comfy, client, tmp_path):
    """A LoRA in ComfyUI's `diffusion_model.` layout (peft lora_A / lora_B), strength 0.5, equals the core on the
    DiT with the delta merged; and in kohya's `lora_unet_` spelling."""
    g = torch.Generator().manual_seed(3)
    dit = models21.dit
    sd, deltas = {}, {}
    for i, key in enumerate(LORA_KEYS):
        weight = dit.get_submodule(key).weight
        down, up = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g) * 0.1
        prefix = "diffusion_model." if i == 0 else "lora_unet_"
        name = f"{prefix}{key}" if i == 0 else f"{prefix}{key.replace('.', '_')}"  # kohya: lora_unet_a_b_c
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        deltas[key] = 0.5 * up @ down
    save_file(sd, str(comfy.models_dir / "loras" / LORA))
    out, said = run(comfy, client, graph(lora=LORA))
    base = {k: dit.get_submodule(k).weight.detach().clone() for k in LORA_KEYS}
    try:
        for k in LORA_KEYS:
            dit.get_submodule(k).weight.data += deltas[k]
        core = core_sampler(models21)
        want_exact, want_simple = core(exact), core(simple)
    finally:
        for k in LORA_KEYS:
            dit.get_submodule(k).weight.data.copy_(base[k])
    check("SamplerCustomAdvanced with the LoRA vs core on merged weights", out["sca"], want_exact)
    check("KSampler with the LoRA vs core on merged weights", out["ks"], want_simple)
    assert float(np.abs(want_exact.numpy() - core_sampler(models21)(exact).numpy()).max()) > 100 * TOL  # it acts


def test_unset_shift_is_warned(models21, comfy, client):
    """KSampler on the loader's MODEL (shift for 1024²) and a 64x96 latent: equal to the core on that shift,
    and the mismatch is said."""
    prompt = graph()
    prompt["ks"]["inputs"]["model"] = ["dit", 1]
    out, said = run(comfy, client, prompt)
    assert any("Qwen-Image-2.1 Model Sampling" in m for m in said), said
    want = core_sampler(models21)(lambda n: simple_sigmas(4096, STEPS))
    check("KSampler on the 1024² shift vs core", out["ks"], want)


def test_v1_conditioning_on_the_21_model_is_named(models21, client):
    prompt = graph()
    prompt["v1cond"] = node("QwenPixTestConditioning", seed=1, tokens=5, dim=40)
    prompt["ks"]["inputs"]["positive"] = ["v1cond", 0]
    for k in ("s21", "dump_s21", "sca", "dump_sca"):
        del prompt[k]
    fails(client, prompt, "ks", "not from Qwen-Image-2.1 Encode")


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


def lora_graph(lora: str) -> dict:
    """Qwen-Image-2.1 LoRA on the MODEL, SamplerCustomAdvanced on the exact sigmas, dumped as sca."""
    g = graph()
    for k in ("s21", "dump_s21", "ms", "ks", "dump_ks"):
        del g[k]
    g["lora"] = node("QwenPix21LoRA", model=["dit", 1], lora_name=lora, strength=0.5)
    g["guide"]["inputs"]["model"] = ["lora", 0]
    return g


def test_21_lora_node_reads_diffusers_keys_and_refuses_unknown_ones(models21, comfy, client):
    """`transformer.<module>` keys (diffusers / PEFT) and bare module names through Qwen-Image-2.1 LoRA equal the
    core on the merged weights; a file with a key naming no module is refused, listing it."""
    g = torch.Generator().manual_seed(4)
    dit, sd, deltas = models21.dit, {}, {}
    for i, key in enumerate(LORA_KEYS):
        weight = dit.get_submodule(key).weight
        down, up = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g) * 0.1
        name = f"transformer.{key}" if i == 0 else key
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        deltas[key] = 0.5 * up @ down
    save_file(sd, str(comfy.models_dir / "loras" / "q21_diffusers_lora.safetensors"))
    out, _ = run(comfy, client, lora_graph("q21_diffusers_lora.safetensors"))
    base = {k: dit.get_submodule(k).weight.detach().clone() for k in LORA_KEYS}
    try:
        for k in LORA_KEYS:
            dit.get_submodule(k).weight.data += deltas[k]
        want = core_sampler(models21)(exact)
    finally:
        for k in LORA_KEYS:
            dit.get_submodule(k).weight.data.copy_(base[k])
    check("Qwen-Image-2.1 LoRA (transformer. / bare keys) vs core on merged weights", out["sca"], want)
    sd["transformer.no_such_block.to_q.lora_A.weight"] = sd[f"transformer.{LORA_KEYS[0]}.lora_A.weight"].clone()
    save_file(sd, str(comfy.models_dir / "loras" / "q21_bad_lora.safetensors"))
    fails(client, lora_graph("q21_bad_lora.safetensors"), "lora", "transformer.no_such_block.to_q.lora_A.weight",
          "name no module")  # fmt: skip
