"""Live latent previews reach the websocket when ComfyUI's previews are on (`--preview-method auto`)."""

from __future__ import annotations

import pytest

from conftest import TEST_PACK
from graphs import sampler_node
from tools.checkpoints.smoke import write_smoke
from tools.comfy_harness import ComfyClient, ComfyServer

pytestmark = pytest.mark.e2e


def test_sampler_sends_a_jpeg_preview_per_step(tmp_path):
    server = ComfyServer(tmp_path / "previews", extra_packs=(TEST_PACK,))
    server.prepare()
    write_smoke("diffusion_models", server.models_dir / "diffusion_models" / "tiny.safetensors")
    server.start(extra_args=("--preview-method", "auto"))
    try:
        client = ComfyClient(server.url).connect()
        steps = 3
        prompt = {
            "dit": {
                "class_type": "QwenPixDiTLoader",
                "inputs": {"dit_name": "tiny.safetensors", "compute_dtype": "fp32"},
            },
            "pos": {"class_type": "QwenPixTestConditioning", "inputs": {"seed": 1, "tokens": 5, "dim": 256}},
            "neg": {"class_type": "QwenPixTestConditioning", "inputs": {"seed": 2, "tokens": 3, "dim": 256}},
            "lat": {
                "class_type": "QwenPixEmptyLatent",
                "inputs": {"aspect": "custom", "width": 64, "height": 64, "batch_size": 1},
            },
            "s": sampler_node(("dit", 0), ("lat", 0), steps=steps, cfg=4.0, rescale="norm (diffusers)"),
            "out": {"class_type": "QwenPixTestSink", "inputs": {"value": ["s", 0]}},
        }
        res = client.run(prompt, timeout=300)
        client.close()
        assert res.status == "success", res.error()
        jpegs = [f for f in client.binary_frames if f[8:10] == b"\xff\xd8"]  # event type, image type, JPEG data
        assert len(jpegs) == steps, [f[:12] for f in client.binary_frames]
    finally:
        server.stop()
