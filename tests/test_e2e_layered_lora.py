"""A LoRA on the Qwen-Image-Layered MODEL is honoured by the Layered Sampler (issue 16 follow-up), through a real
ComfyUI server: behind our LoRA node and behind ComfyUI's LoraLoaderModelOnly, at strength s, the sampler's layered
latent equals the latent of `qwen_image_core.layered.decompose` run on the same DiT with the LoRA merged into its
weights (W + s * alpha / r * up @ down, in float32, by this test), and differs from the run without the LoRA.
The server decodes nothing (the decode is the VAE's, tested in test_e2e_layered.py): that keeps the test short."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from native_graphs import load, node, run
from qwen_image_core import layered
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.lora import load_lora
from qwen_image_core.mmdit import load_dit
from qwen_image_core.vae import normalize_latents
from tools.checkpoints import dit as W
from tools.checkpoints import lora as L
from tools.checkpoints.vae import write_vae

pytestmark = pytest.mark.e2e

DIT, VAE, LORA = "qp_layered_lora_dit.safetensors", "qp_layered_lora_vae.safetensors", "qp_layered_lora.safetensors"
CFG = W.tiny_config(num_layers=1, **W.LAYERED)  # one block: ComfyUI's CPU attention (sub-quadratic) is slow
STRENGTH = 0.7
TOKENS, WIDTH, HEIGHT, LAYERS, SEED, STEPS = 9, 96, 64, 1, 5, 2
REL = 1e-5


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    W.write_comfy(comfy.models_dir / "diffusion_models" / DIT, CFG, seed=11, dtype=torch.bfloat16)
    vae = write_vae(tmp_path_factory.mktemp("layered_lora_vae") / VAE, "comfy", base_dim=8, image_channels=4, seed=3)
    shutil.copyfile(vae, comfy.models_dir / "vae" / VAE)
    L.write_lora(comfy.models_dir / "loras" / LORA, CFG, "kohya", rank=4, alpha=8.0, seed=7)
    return comfy


def _case(name: str, model: str) -> dict:
    """Layered Sampler on `model` -> its latent dumped as `<name>_latent`."""
    sample = node("QwenPixLayeredSampler", dit=[model, 0], vae=["vae", 0], positive=["pos", 0], negative=["neg", 0],
                  image=["img", 0], layers=LAYERS, resolution="640", seed=SEED, steps=STEPS, cfg=1.0,
                  cfg_normalize=False)  # fmt: skip
    return {
        f"{name}_s": sample,
        f"{name}_dl": node("QwenPixTestDumpLatent", samples=[f"{name}_s", 0], name=f"{name}_latent"),
    }


@pytest.fixture(scope="module")
def server_runs(files):
    graph = {
        "dit": node("QwenPixDiTLoader", dit_name=DIT, compute_dtype="fp32", positions="official (diffusers)"),
        "vae": node("QwenPixVAELoader", vae_name=VAE),
        "pos": node("QwenPixTestConditioning", seed=1, tokens=TOKENS, dim=CFG.text_dim),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=1, dim=CFG.text_dim),
        "img": node("QwenPixTestImage", kind="rgba", width=WIDTH, height=HEIGHT, seed=4),
        "ours": node("QwenPixLoraLoader", dit=["dit", 0], lora_name=LORA, strength=STRENGTH),
        "native": node("LoraLoaderModelOnly", model=["dit", 0], lora_name=LORA, strength_model=STRENGTH),
    }
    run(files, {**graph, **_case("ours", "ours"), **_case("native", "native")})
    # then the same loaded MODEL without the LoRA, in a prompt of its own: it runs after the patched ones
    run(files, {**graph, **_case("plain", "dit")})
    return files


def _merged_dit(path, lora_path, strength: float):
    """The layered DiT in float32 with the LoRA merged into its weights (this test's own arithmetic)."""
    dit = load_dit(path).float()
    lora = load_lora(lora_path, dit)
    assert not lora.terms and len(lora.factors) == len(L.lora_modules(CFG))  # plain low-rank pairs, all read
    for f in lora.factors:
        layer = dit.get_submodule(f.module)
        merged = layer.weight.float() + strength * f.scale * (f.up.float() @ f.down.float())
        layer.weight = nn.Parameter(merged, requires_grad=False)
    return dit


def _inputs():
    """The graph's text embeddings [1, T, D] and picture [H, W, 4] (QwenPixTestConditioning, QwenPixTestImage)."""
    cond = torch.randn(1, TOKENS, CFG.text_dim, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, HEIGHT, WIDTH, 4, generator=torch.Generator().manual_seed(4))[0]
    return cond, image


@pytest.fixture(scope="module")
def merged_run(files) -> layered.Decomposition:
    """decompose on the DiT with the LoRA merged at STRENGTH, with the server graph's picture, text and seed."""
    models = files.models_dir
    dit = _merged_dit(models / "diffusion_models" / DIT, models / "loras" / LORA, STRENGTH)
    cond, image = _inputs()
    return layered.decompose(dit, load_vae(models / "vae" / VAE), None, image, "", layers=LAYERS, resolution=640,
                             steps=STEPS, cfg_scale=1.0, seed=SEED, prompt_embeds=(cond, None))  # fmt: skip


def _base_latents(comfy) -> np.ndarray:
    """decompose's sampling steps (without its decode) on the DiT without the LoRA."""
    models = comfy.models_dir
    dit, vae = load_dit(models / "diffusion_models" / DIT).float(), load_vae(models / "vae" / VAE)
    cond, image = _inputs()
    with torch.no_grad():
        pixels = layered.prepare_image(image, 640)  # [1, 4, H, W]
        ref = vae.encode(pixels).float()
        noise = layered.layered_noise(1, LAYERS, *pixels.shape[-2:], SEED)
        sigmas = layered.layered_sigmas(STEPS, tuple(ref.shape[-2:]))
        return layered.sample_layers(dit, noise, ref, cond, sigmas=sigmas, cfg_scale=1.0).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def _server_latent(comfy, name) -> np.ndarray:
    """The sampler's LATENT (ComfyUI's raw layout) as the core's normalised layered latent."""
    raw = torch.from_numpy(load(comfy, f"{name}_latent")).transpose(1, 2)  # [B, F, 16, h, w]
    return normalize_latents(raw.flatten(0, 1)).unflatten(0, raw.shape[:2]).transpose(1, 2).numpy()


@pytest.mark.parametrize("loader", ["ours", "native"])
def test_layered_sampler_with_lora_equals_decompose_on_the_merged_dit(server_runs, merged_run, loader):
    got = _server_latent(server_runs, loader)
    err = _rel(got, merged_run.latents.numpy())
    print(f"\n{loader}: layered latent vs decompose on the merged DiT, max rel diff {err:.2e}")
    assert err <= REL
    diff = float(np.abs(got - _server_latent(server_runs, "plain")).max())
    print(f"{loader}: vs the run without the LoRA, max diff {diff:.2e}")
    assert diff > 1e-2, f"the LoRA changed nothing (max diff {diff:.2e})"


def test_the_run_without_lora_is_the_base_dit(server_runs):
    """The MODEL without the LoRA, run after the two with it (the same loaded model), samples the file's weights."""
    err = _rel(_server_latent(server_runs, "plain"), _base_latents(server_runs))
    print(f"\nplain: layered latent vs the base DiT, max rel diff {err:.2e}")
    assert err <= REL
