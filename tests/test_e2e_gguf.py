"""A GGUF DiT through the real server: the loader lists the .gguf file (where ComfyUI-GGUF keeps them) and its
MODEL runs through our sampler, the native KSampler and both LoRA loaders, equal to the same graphs on an F32
safetensors file of gguf's own dequantised weights (the GGUF stays packed; the twin is plain float32)."""

from __future__ import annotations

import numpy as np
import pytest

from native_graphs import add_case, load, node, run
from tools.checkpoints import dit as D
from tools.checkpoints import gguf as G
from tools.checkpoints import lora as L
from tools.comfy_harness import ComfyClient

pytestmark = pytest.mark.e2e
GGUF, TWIN, LORA = "qp_gguf_dit-Q4_K.gguf", "qp_gguf_twin_f32.safetensors", "qp_gguf_lora.safetensors"
CFG = G.tiny_config()  # text width 256


@pytest.fixture(scope="module")
def server(comfy):
    path = G.write_gguf(comfy.models_dir / "unet" / GGUF, CFG, "Q4_K", types={"proj_out.weight": "Q6_K"})
    weights = G.dequantized(path)
    entries = [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in weights.items()]
    D.write_safetensors(comfy.models_dir / "diffusion_models" / TWIN, entries)
    L.write_lora(comfy.models_dir / "loras" / LORA, CFG, "kohya", rank=4, alpha=8.0, seed=5)
    return comfy


def cases(file: str) -> dict[str, dict]:
    load_ = {"dit": node("QwenPixDiTLoader", dit_name=file, compute_dtype="fp32")}
    cond = {
        "pos": node("QwenPixTestConditioning", seed=1, tokens=7, dim=CFG.text_dim),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=3, dim=CFG.text_dim),
        "lat": node("EmptySD3LatentImage", width=64, height=48, batch_size=1),
    }
    ours = node("QwenPixSampler", dit=["dit", 0], positive=["pos", 0], negative=["neg", 0], latent_image=["lat", 0],
                seed=5, steps=2, cfg=4.0, sampler_name="euler", schedule="shift (ComfyUI workflows)", shift=3.1,
                cfg_rescale="none", denoise=1.0)  # fmt: skip

    def ks(model):
        return {
            "ms": node("ModelSamplingAuraFlow", model=[model, 0], shift=3.1),
            "k": node(
                "KSampler",
                model=["ms", 0],
                seed=5,
                steps=2,
                cfg=4.0,
                sampler_name="euler",
                scheduler="simple",
                positive=["pos", 0],
                negative=["neg", 0],
                latent_image=["lat", 0],
                denoise=1.0,
            ),  # fmt: skip
        }

    ours_lora = node("QwenPixLoraLoader", dit=["dit", 0], lora_name=LORA, strength=0.8)
    native_lora = node("LoraLoaderModelOnly", model=["dit", 0], lora_name=LORA, strength_model=0.8)
    return {
        "sampler": {**load_, **cond, "s": ours},
        "ksampler": {**load_, **cond, **ks("dit")},
        "our_lora": {**load_, **cond, "l": ours_lora, **ks("l")},
        "native_lora": {**load_, **cond, "l": native_lora, **ks("l")},
    }


def test_a_gguf_dit_runs_through_our_sampler_ksampler_and_loras_as_its_float32_twin(server):
    client = ComfyClient(server.url).connect()
    try:
        listed = client.object_info()["QwenPixDiTLoader"]["input"]["required"]["dit_name"][0]
    finally:
        client.close()
    assert GGUF in listed and TWIN in listed
    graph = {}
    for side, file in (("gguf", GGUF), ("twin", TWIN)):
        for name, nodes in cases(file).items():
            add_case(graph, f"gguf_{name}_{side}", nodes)
    run(server, graph)
    outs = {}
    for name in cases(GGUF):
        a, b = load(server, f"gguf_{name}_gguf"), load(server, f"gguf_{name}_twin")
        assert a.shape == b.shape and np.isfinite(a).all()
        diff = float(np.abs(a - b).max())
        print(f"\n{name}: GGUF Q4_K vs its F32 twin, max diff {diff:.3g}")
        assert diff <= 1e-5 * max(1.0, float(np.abs(b).max())), name
        outs[name] = a
    assert np.abs(outs["sampler"] - outs["ksampler"]).max() <= 1e-5  # our sampler = KSampler on the shift schedule
    assert np.abs(outs["our_lora"] - outs["ksampler"]).max() > 1e-3  # the LoRA does something
    assert np.abs(outs["our_lora"] - outs["native_lora"]).max() <= 1e-5  # both LoRA loaders agree
