"""An int8_convrot DiT (the layout of Comfy-Org's `qwen_image_edit_2511_int8_convrot`: int8 block linears with
per-row float32 scales after a group-256 ConvRot, `comfy_quant` markers, the 2511 marker) through the real
server: our loader lists and loads it (the node shows its format and size), and its MODEL runs through our
sampler, the native KSampler and ComfyUI's LoRA loader, equal to the same graphs on a float32 file of
comfy-kitchen's dequantised weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_comfy_quant import kitchen_weights

from native_graphs import add_case, load, node, run
from tools.checkpoints import comfy_quant as C
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L

pytestmark = pytest.mark.e2e
INT8, TWIN = "qwen_image_edit_2511_int8_convrot_tiny.safetensors", "qp_int8_convrot_twin_f32.safetensors"
LORA = "qp_int8_convrot_lora.safetensors"
CFG = C.tiny_config()


@pytest.fixture(scope="module")
def server(comfy):
    path = C.write_dit(comfy.models_dir / "diffusion_models" / INT8, CFG, "int8_convrot", zero_cond_t=True)
    weights = kitchen_weights(path, D.shapes(CFG))
    entries = [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in weights.items()]
    entries.append(("__index_timestep_zero__", (0,), torch.bfloat16, lambda: torch.empty(0)))
    D.write_safetensors(comfy.models_dir / "diffusion_models" / TWIN, entries, D.config_metadata(CFG))
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
    ks = node("KSampler", model=["ms", 0], seed=5, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple",
              positive=["pos", 0], negative=["neg", 0], latent_image=["lat", 0], denoise=1.0)  # fmt: skip
    return {
        "sampler": {**load_, **cond, "s": ours},
        "ksampler": {**load_, **cond, "ms": node("ModelSamplingAuraFlow", model=["dit", 0], shift=3.1), "k": ks},
        "native_lora": {**load_, **cond, "l": node("LoraLoaderModelOnly", model=["dit", 0], lora_name=LORA,
                        strength_model=0.8), "ms": node("ModelSamplingAuraFlow", model=["l", 0], shift=3.1), "k": ks},
    }  # fmt: skip


def test_an_int8_convrot_dit_runs_through_our_sampler_and_ksampler_as_its_float32_twin(server):
    graph = {}
    for side, file in (("int8", INT8), ("twin", TWIN)):
        for name, nodes in cases(file).items():
            add_case(graph, f"cq_{name}_{side}", nodes)
    res = run(server, graph)
    plans = [e["data"]["output"]["qwenpix_plan"] for e in res.events
             if e["type"] == "executed" and e["data"]["node"].endswith("_int8_dit")]  # fmt: skip
    assert plans and plans[0][0].startswith("int8_convrot (int8 + per-row scales): 28 layers, the rest bf16; "), plans
    outs = {}
    for name in cases(INT8):
        a, b = load(server, f"cq_{name}_int8"), load(server, f"cq_{name}_twin")
        assert a.shape == b.shape and np.isfinite(a).all()
        diff = float(np.abs(a - b).max())
        print(f"\n{name}: int8_convrot vs its float32 twin, max diff {diff:.3g}")
        assert diff <= 1e-5 * max(1.0, float(np.abs(b).max())), name
        outs[name] = a
    assert np.abs(outs["sampler"] - outs["ksampler"]).max() <= 1e-5  # our sampler = KSampler on the shift schedule
    assert np.abs(outs["native_lora"] - outs["ksampler"]).max() > 1e-3  # the LoRA does something
