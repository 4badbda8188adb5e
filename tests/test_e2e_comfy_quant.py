"""An int8_convrot DiT (the layout of Comfy-Org's `qwen_image_edit_2511_int8_convrot`: int8 block linears with
per-row float32 scales after a group-256 ConvRot, `comfy_quant` markers, the 2511 marker) through the real
server: our loader lists and loads it (the node shows its format and size), and its MODEL runs through our
sampler, the native KSampler and ComfyUI's LoRA loader, equal to the same graphs on a float32 file of
comfy-kitchen's dequantised weights."""

from __future__ import annotations

import pytest
import torch

from native_graphs import packed_equals_its_twin
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
    weights = C.kitchen_weights(path, D.shapes(CFG))
    entries = [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in weights.items()]
    entries.append(("__index_timestep_zero__", (0,), torch.bfloat16, lambda: torch.empty(0)))
    D.write_safetensors(comfy.models_dir / "diffusion_models" / TWIN, entries, D.config_metadata(CFG))
    L.write_lora(comfy.models_dir / "loras" / LORA, CFG, "kohya", rank=4, alpha=8.0, seed=5)
    return comfy


def test_an_int8_convrot_dit_runs_through_our_sampler_and_ksampler_as_its_float32_twin(server):
    res = packed_equals_its_twin(server, "cq", INT8, TWIN, CFG.text_dim, LORA)
    plans = [e["data"]["output"]["qwenpix_plan"] for e in res.events
             if e["type"] == "executed" and e["data"]["node"].endswith("_packed_dit")]  # fmt: skip
    assert plans and plans[0][0].startswith("int8_convrot (int8 + per-row scales): 28 layers, the rest bf16; "), plans
