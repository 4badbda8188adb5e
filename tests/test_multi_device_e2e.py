"""The DiT loader's `devices` through the real ComfyUI server (CPU): a device that does not exist, or a non-CUDA
one, is the loader's error naming it; empty loads as before."""

from __future__ import annotations

import pytest
import torch

from graphs import fails, sink
from tools.checkpoints import dit as W

pytestmark = pytest.mark.e2e
NAME = "qp_multi_device_dit.safetensors"


@pytest.fixture(scope="module")
def dit(comfy):
    W.write_comfy(comfy.models_dir / "diffusion_models" / NAME, W.tiny_config(num_layers=1), dtype=torch.bfloat16)
    return NAME


def prompt(devices: str, salt: int) -> dict:
    loader = {
        "class_type": "QwenPixDiTLoader",
        "inputs": {"dit_name": NAME, "compute_dtype": "fp32", "devices": devices},
    }
    return {"dit": loader, "out": sink(("dit", 0), salt)}


def test_devices_input_errors(client, dit):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0  # the server's machine is this one
    fails(client, prompt(f"cuda:{n}", 1), "dit", "devices", f"cuda:{n}' does not exist on this machine", "Fix:")
    fails(client, prompt("cpu", 2), "dit", "devices", "CUDA devices only")
    fails(client, prompt("cuda:0,cuda:0", 3), "dit", "listed twice")
    assert client.run(prompt("", 4), timeout=300).status == "success"
