"""A GGUF text encoder through the real server: llama.cpp's Qwen2.5-VL files in models/text_encoders (the language
model Q8_0 and its mmproj beside it) are listed by our loader (the mmproj is not: it is found next to its model),
load packed (the node shows the format), and Text Encode -> our sampler gives the same latents as on a float32
safetensors twin of gguf's own dequantised weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs import sampler_node
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as W
from tools.checkpoints import qwen_vl_gguf as T
from tools.checkpoints.smoke import dit_config
from tools.comfy_harness import ComfyClient

pytestmark = pytest.mark.e2e
GGUF, MMPROJ = "qp_gguf_te-Q8_0.gguf", "qp_gguf_te-mmproj-F16.gguf"
TWIN, DIT = "qp_gguf_te_twin_f32.safetensors", "qp_gguf_te_dit.safetensors"


@pytest.fixture(scope="module")
def server(comfy):
    ref, folder = W.reference_model(seed=3), comfy.models_dir / "text_encoders"
    text, mmproj = T.write_text(folder / GGUF, ref, "Q8_0"), T.write_mmproj(folder / MMPROJ, ref, "F16")
    W.write_comfy_single(folder / TWIN, T.reference_weights(text, mmproj, ref), dtype=torch.float32)
    D.write_comfy(comfy.models_dir / "diffusion_models" / DIT, dit_config())
    return comfy


def graph(te: str, tag: str) -> dict:
    latent = {"aspect": "custom", "width": 32, "height": 32, "batch_size": 1}
    return {
        f"{tag}_dit": {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": DIT, "compute_dtype": "fp32"}},
        f"{tag}_te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": te}},
        f"{tag}_pos": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": [f"{tag}_te", 0],
                                                                     "prompt": "a red fox in the snow"}},
        f"{tag}_neg": {"class_type": "QwenPixTextEncode", "inputs": {"text_encoder": [f"{tag}_te", 0], "prompt": " "}},
        f"{tag}_lat": {"class_type": "QwenPixEmptyLatent", "inputs": latent},
        f"{tag}_s": sampler_node((f"{tag}_dit", 0), (f"{tag}_lat", 0), (f"{tag}_pos", 0), (f"{tag}_neg", 0), seed=7,
                                 steps=1, cfg=2.5),
        f"{tag}_dump": {"class_type": "QwenPixTestDumpLatent", "inputs": {"samples": [f"{tag}_s", 0], "name": tag}},
    }  # fmt: skip


def test_a_gguf_text_encoder_runs_through_text_encode_and_our_sampler_as_its_float32_twin(server):
    client = ComfyClient(server.url).connect()
    try:
        listed = client.object_info()["QwenPixTextEncoderLoader"]["input"]["required"]["text_encoder_name"][0]
        assert GGUF in listed and TWIN in listed and MMPROJ not in listed
        res = client.run({**graph(GGUF, "qp_gte_gguf"), **graph(TWIN, "qp_gte_twin")}, timeout=600)
    finally:
        client.close()
    assert res.status == "success", res.error()
    plans = [e["data"]["output"]["qwenpix_plan"] for e in res.events
             if e["type"] == "executed" and e["data"]["node"] == "qp_gte_gguf_te"]  # fmt: skip
    assert plans and plans[0][0].startswith("GGUF Q8_0 (") and f"; vision tower {MMPROJ}: GGUF F16 (" in plans[0][0]
    a, b = (np.load(server.output_dir / f"qp_gte_{side}.npy") for side in ("gguf", "twin"))
    diff = float(np.abs(a - b).max())
    print(f"\nGGUF text encoder vs its float32 twin through Text Encode and our sampler: max diff {diff:.3g}")
    assert a.shape == b.shape and np.isfinite(a).all() and diff <= 1e-5
