"""Shared fixtures. `comfy` is a real ComfyUI server with this pack loaded, started once per test session."""

from __future__ import annotations

import pytest

from tools.comfy_harness import ComfyClient, ComfyServer


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI (CPU) in an isolated base directory; tests put model files in `comfy.models_dir`."""
    server = ComfyServer(tmp_path_factory.mktemp("comfy"))
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
