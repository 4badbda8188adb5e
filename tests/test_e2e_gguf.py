"""A GGUF DiT through the real server: the loader lists the .gguf file (where ComfyUI-GGUF keeps them) and its
MODEL runs through our sampler, the native KSampler and both LoRA loaders, equal to the same graphs on an F32
safetensors file of gguf's own dequantised weights (the GGUF stays packed; the twin is plain float32)."""

from __future__ import annotations

import pytest

from native_graphs import packed_equals_its_twin
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


def test_a_gguf_dit_runs_through_our_sampler_ksampler_and_loras_as_its_float32_twin(server):
    client = ComfyClient(server.url).connect()
    try:
        listed = client.object_info()["QwenPixDiTLoader"]["input"]["required"]["dit_name"][0]
    finally:
        client.close()
    assert GGUF in listed and TWIN in listed
    packed_equals_its_twin(server, "gguf", GGUF, TWIN, CFG.text_dim, LORA)
