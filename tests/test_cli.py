"""`python -m qwen_image_core` writes PNGs of the requested size from tiny checkpoint files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from oracles import TOKENIZER
from tools.checkpoints.smoke import write_smoke

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {
        "--dit": write_smoke("diffusion_models", d / "qwen_image_fp8_e4m3fn.safetensors"),
        "--vae": write_smoke("vae", d / "qwen_image_vae.safetensors"),
        "--text-encoder": write_smoke("text_encoders", d / "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
        "--tokenizer": TOKENIZER,
    }


def cli(files, *args):
    weights = [str(x) for kv in files.items() for x in kv]
    r = subprocess.run(
        [sys.executable, "-m", "qwen_image_core", *args[:1], *weights, *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_generate_writes_png_of_requested_size(files, tmp_path):
    out = tmp_path / "cat.png"
    r = cli(
        files, "generate", "--prompt", "a cat", "--width", "96", "--height", "64", "--steps", "2", "--out", str(out)
    )
    assert "wrote" in r.stdout
    with Image.open(out) as im:
        assert im.size == (96, 64)


def test_edit_keep_size_with_two_images(files, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(a)
    Image.new("RGB", (40, 70), (30, 200, 30)).save(b)
    out = tmp_path / "edit.png"
    cli(
        files,
        "edit",
        "--prompt",
        "blend them",
        "--image",
        str(a),
        "--image",
        str(b),
        "--resize",
        "keep",
        "--steps",
        "2",
        "--lora",
        str(write_smoke("loras", tmp_path / "l.safetensors")) + ":0.5",
        "--out",
        str(out),
    )
    with Image.open(out) as im:
        assert im.size == (80, 48)
