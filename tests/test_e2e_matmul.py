"""The DiT loader's matmul option through the real server (issue 13, 4): an int8_convrot file with matmul "int8"
runs through KSampler and our LoRA node, near the default dequantised run but not equal (the activations are
quantised), and the node says how many layers the mode covers; "fp8" on that file covers none and says so."""

from __future__ import annotations

import numpy as np
import pytest

from native_graphs import add_case, ksampler, load, node, run
from tools.checkpoints import comfy_quant as C
from tools.checkpoints import lora as L

pytestmark = pytest.mark.e2e
INT8, LORA = "qp_matmul_int8_convrot.safetensors", "qp_matmul_lora.safetensors"
CFG = C.tiny_config()


def case(mode: str, lora: bool) -> dict:
    nodes = {
        "dit": node("QwenPixDiTLoader", dit_name=INT8, compute_dtype="fp32", matmul=mode),
        "pos": node("QwenPixTestConditioning", seed=1, tokens=7, dim=CFG.text_dim),
        "neg": node("QwenPixTestConditioning", seed=2, tokens=3, dim=CFG.text_dim),
        "lat": node("EmptySD3LatentImage", width=64, height=48, batch_size=1),
    }
    model = "dit"
    if lora:
        nodes["l"] = node("QwenPixLoraLoader", dit=["dit", 0], lora_name=LORA, strength=0.8)
        model = "l"
    nodes["ms"] = node("ModelSamplingAuraFlow", model=[model, 0], shift=3.1)
    nodes["k"] = ksampler("ms", lat="lat")
    return nodes


def test_int8_matmul_runs_near_the_dequantised_model_and_reports_its_coverage(comfy):
    C.write_dit(comfy.models_dir / "diffusion_models" / INT8, CFG, "int8_convrot")
    L.write_lora(comfy.models_dir / "loras" / LORA, CFG, "kohya", rank=4, alpha=8.0, seed=5)
    graph = {}
    for mode, lora in (("off", False), ("int8", False), ("fp8", False), ("int8", True)):
        add_case(graph, f"mm_{mode}_{int(lora)}", case(mode, lora))
    res = run(comfy, graph)
    lines = {e["data"]["node"]: e["data"]["output"]["qwenpix_plan"] for e in res.events
             if e["type"] == "executed" and e["data"]["node"].endswith("_dit")}  # fmt: skip
    assert lines["mm_int8_0_dit"][-1].startswith("matmul int8: 28 of "), lines
    assert "no layer of this model" in lines["mm_fp8_0_dit"][-1], lines
    off, int8, fp8 = (load(comfy, f"mm_{m}_0") for m in ("off", "int8", "fp8"))
    assert np.array_equal(fp8, off)  # fp8 covers no int8 layer: the dequantised path, bit for bit
    rel = float(np.abs(int8 - off).max() / np.abs(off).max())
    print(f"\nint8 matmul vs dequantised: max rel diff {rel:.2e}")
    assert 0 < rel < 0.05
    assert np.abs(load(comfy, "mm_int8_1") - load(comfy, "mm_int8_0")).max() > 1e-3  # the LoRA applies beside
