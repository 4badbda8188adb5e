"""Our nodes mixed with ComfyUI's native ones, through the real server.

* LATENT: our sampler + native VAE Decode = our sampler + our decode; native VAE Encode + our sampler =
  our encode + our sampler (float images compared through a test node that dumps them exactly).
* CONDITIONING: a plain native-layout conditioning (test node) drives our sampler; our text encoder's
  conditioning drives a native KSampler on a natively loaded model.
* The same graph on our nodes and on ComfyUI's native Qwen-Image nodes (UNETLoader, ModelSamplingAuraFlow,
  KSampler euler/simple, VAEDecode) from one full-width checkpoint file and the same conditioning gives the
  same image. (ComfyUI fixes the DiT widths, so that file is one full-width block, 0.7 GB bf16.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from graphs import sampler_node
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as Q
from tools.checkpoints.smoke import write_smoke

pytestmark = pytest.mark.e2e
TINY_DIT = "qwenpix_tiny_bf16.safetensors"
WIDE_DIT = "qwen_image_one_block_bf16.safetensors"
WIDE_TE = "qwen_2.5_vl_wide_tiny_bf16.safetensors"
JOINT_DIM = 3584  # the text width ComfyUI's Qwen-Image DiT is built with


@pytest.fixture(scope="module")
def files(comfy, tiny_comfy_vae):
    models = comfy.models_dir
    write_smoke("diffusion_models", models / "diffusion_models" / TINY_DIT)
    D.write_comfy(models / "diffusion_models" / WIDE_DIT, D.config(num_layers=1), dtype=torch.bfloat16)
    # a text encoder whose hidden size is the real 3584, so its conditioning fits ComfyUI's fixed-width DiT
    wide = dict(
        hidden_size=JOINT_DIM, num_attention_heads=28, num_key_value_heads=4, intermediate_size=64, num_hidden_layers=1
    )
    sd = Q.legacy_state_dict(Q.reference_model(seed=0, text=wide))
    Q.write_comfy_single(models / "text_encoders" / WIDE_TE, sd, lm_head=False)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(comfy.input_dir / "interop.png")
    return {"vae": tiny_comfy_vae}


def dumped(comfy, name) -> np.ndarray:
    return np.load(comfy.output_dir / f"{name}.npy")


def cond(seed, dim=Q.TINY_TEXT["hidden_size"], tokens=7):
    return {"class_type": "QwenPixTestConditioning", "inputs": {"seed": seed, "tokens": tokens, "dim": dim}}


def ours_sampler(model, latent, steps=3, cfg=4.0, denoise=1.0, shift=3.1, rescale="none"):
    return sampler_node(model, latent, seed=7, steps=steps, cfg=cfg, shift=shift, rescale=rescale, denoise=denoise)


def decode_ours(samples):
    return {
        "class_type": "QwenPixDecode",
        "inputs": {"vae": ["qvae", 0], "samples": samples, "tiling": "off", "tile_size": 512, "overlap": 64},
    }


def dump(images, name):
    return {"class_type": "QwenPixTestDumpImage", "inputs": {"images": images, "name": name}}


def run(client, prompt):
    res = client.run(prompt, timeout=600)
    assert res.status == "success", res.error()
    return res


def test_latents_interoperate_with_native_vae_nodes(comfy, client, files):
    base = {
        "dit": {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": TINY_DIT, "compute_dtype": "fp32"}},
        "qvae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": files["vae"]}},
        "nvae": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "pos": cond(1),
        "neg": cond(2, tokens=3),
        "empty": {
            "class_type": "QwenPixEmptyLatent",
            "inputs": {"aspect": "custom", "width": 64, "height": 48, "batch_size": 1},
        },
        "img": {"class_type": "LoadImage", "inputs": {"image": "interop.png"}},
        # text-to-image: one sampler, decoded by us and by ComfyUI
        "s1": ours_sampler(["dit", 0], ["empty", 0]),
        "d_ours": decode_ours(["s1", 0]),
        "d_native": {"class_type": "VAEDecode", "inputs": {"samples": ["s1", 0], "vae": ["nvae", 0]}},
        # img2img: encoded by ComfyUI and by us, sampled by us
        "e_native": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["nvae", 0]}},
        "e_ours": {
            "class_type": "QwenPixEncode",
            "inputs": {"vae": ["qvae", 0], "image": ["img", 0], "tiling": "off", "tile_size": 512, "overlap": 64},
        },
        "s2": ours_sampler(["dit", 0], ["e_native", 0], denoise=0.6),
        "s3": ours_sampler(["dit", 0], ["e_ours", 0], denoise=0.6),
        "x1": dump(["d_ours", 0], "t2i_ours_decode"),
        "x2": dump(["d_native", 0], "t2i_native_decode"),
        "x3": dump(["dn", 0], "i2i_native_encode"),
        "dn": decode_ours(["s2", 0]),
        "do": decode_ours(["s3", 0]),
        "x4": dump(["do", 0], "i2i_ours_encode"),
    }
    res = run(client, base)
    plans = [
        e["data"]["output"]["qwenpix_plan"]
        for e in res.events
        if e["type"] == "executed" and e["data"]["node"] == "dit"
    ]
    assert plans and plans[0][-1].startswith("CPU"), plans  # the loader reports where the weights live
    a, b = dumped(comfy, "t2i_ours_decode"), dumped(comfy, "t2i_native_decode")
    assert a.shape == b.shape == (1, 48, 64, 3)
    assert np.abs(a - b).max() <= 1e-3
    c, d = dumped(comfy, "i2i_native_encode"), dumped(comfy, "i2i_ours_encode")
    assert c.shape == d.shape == (1, 64, 64, 3)
    assert np.abs(c - d).max() <= 1e-3


def test_our_conditioning_drives_native_ksampler(comfy, client, files):
    prompt = {
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": WIDE_TE}},
        "pos": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": "a red boat"}},
        "neg": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": " "}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": WIDE_DIT, "weight_dtype": "default"}},
        "ms": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["unet", 0], "shift": 3.1}},
        "empty": {
            "class_type": "QwenPixEmptyLatent",
            "inputs": {"aspect": "custom", "width": 64, "height": 64, "batch_size": 1},
        },
        "ks": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ms", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["empty", 0],
                "denoise": 1.0,
            },
        },
        "nvae": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["nvae", 0]}},
        "x": dump(["dec", 0], "native_ksampler_our_cond"),
    }
    run(client, prompt)
    out = dumped(comfy, "native_ksampler_our_cond")
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_same_graph_on_our_nodes_and_native_nodes(comfy, client, files):
    common = {
        "pos": cond(11, dim=JOINT_DIM, tokens=9),
        "neg": cond(12, dim=JOINT_DIM, tokens=4),
        "empty": {
            "class_type": "QwenPixEmptyLatent",
            "inputs": {"aspect": "custom", "width": 64, "height": 64, "batch_size": 1},
        },
        "nvae": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
    }
    native = {
        **common,
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": WIDE_DIT, "weight_dtype": "default"}},
        "ms": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["unet", 0], "shift": 3.1}},
        "ks": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ms", 0],
                "seed": 7,
                "steps": 3,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["empty", 0],
                "denoise": 1.0,
            },
        },
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["nvae", 0]}},
        "x": dump(["dec", 0], "same_graph_native"),
    }
    ours = {
        **common,
        "dit": {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": WIDE_DIT, "compute_dtype": "fp32"}},
        "s": ours_sampler(["dit", 0], ["empty", 0], steps=3, cfg=4.0, shift=3.1, rescale="none"),
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["s", 0], "vae": ["nvae", 0]}},
        "x": dump(["dec", 0], "same_graph_ours"),
    }
    run(client, native)
    run(client, ours)
    a, b = dumped(comfy, "same_graph_native"), dumped(comfy, "same_graph_ours")
    assert a.shape == b.shape == (1, 64, 64, 3)
    err = np.abs(a - b).max()
    assert err <= 1e-3, f"max abs pixel diff {err:.3g}"
