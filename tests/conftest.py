"""Shared fixtures. `comfy` is a real ComfyUI server with this pack loaded, started once per test session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tools.comfy_harness import ComfyClient, ComfyServer
from tools.run_workflows import stage_models

TEST_PACK = Path(__file__).resolve().parent / "comfy_test_pack"  # test-only helper nodes


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI (CPU) in an isolated base directory; tests put model files in `comfy.models_dir`."""
    server = ComfyServer(tmp_path_factory.mktemp("comfy"), extra_packs=(TEST_PACK,))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(comfy):
    """A client connected to the server's websocket, closed after the test."""
    c = ComfyClient(comfy.url).connect()
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_comfy_vae(comfy):
    """A tiny Qwen-Image VAE (Wan naming, ComfyUI's layout) in the server's models/vae folder; returns its name."""
    from tools.checkpoints.vae import write_vae

    return write_vae(comfy.models_dir / "vae", "comfy", base_dim=16).name


@pytest.fixture(scope="session")
def example_models(comfy):
    """The example workflows' model files (tiny smoke weights under the real names) and reference images, staged
    once into the server's models and input folders; returns the server."""
    workflows = Path(__file__).resolve().parent.parent / "workflows"
    prompts = [json.loads(p.read_text()) for p in sorted((workflows / "api").glob("*.json"))]
    stage_models(prompts, comfy.base_dir / "no-real-models", comfy.models_dir)
    for image in (workflows / "inputs").glob("*.png"):
        shutil.copyfile(image, comfy.input_dir / image.name)
    return comfy


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: on 2 cores the OpenMP hand-offs of small ops cost
    more than the second thread gains (5-10x slower when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
