"""The example workflows through the real ComfyUI server, on tiny smoke-test weights in the real formats.

Each API workflow runs as shipped except for the number of steps (2, to fit CI on a CPU; the 2.1 Turbo
schedule keeps its fixed 8) and the output prefix; the image sizes are the ones the workflow asks for. Also:
progress on /ws, interruption.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.run_workflows import FIXED_STEPS, SAMPLERS

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
API = sorted((ROOT / "workflows" / "api").glob("*.json"))
# (width, height) each workflow produces: presets, the official edit size of the 384x256 example (about
# 1 MP at 3:2, sides multiples of 32) and, for "keep size", the first reference's own size
EXPECTED_SIZE = {
    "qwen_image_t2i": (1328, 1328),  # the official template's size
    "qwen_image_lightning_8step": (1328, 1328),
    "qwen_image_edit": (1248, 832),
    "qwen_image_edit_2509_two_images": (1248, 832),
    "qwen_image_edit_2511_three_images": (384, 256),
    "qwen_image_native_ksampler": (1328, 1328),
    "qwen_image_layered": (768, 512),  # the 384x256 example at about 640^2 (sides multiples of 32)
    "qwen_image_controlnet_union": (1328, 1328),  # the official template's size
    "qwen_image_controlnet_inpaint": (384, 256),  # composited back onto the (masked) example input
    "qwen_image_2512_controlnet_fun": (1328, 1328),  # the official 2512 ControlNet template's size
    "qwen_image_edit_masked_crop_stitch": (384, 256),  # the crop stitched back into the example input
    "qwen_image_21_t2i": (1024, 1024),  # the 2.1 templates' size
    "qwen_image_21_turbo_t2i": (1024, 1024),
    "qwen_image_21_edit_3_references": (384, 256),  # image1's own size (references padded, cropped back)
    "qwen_image_21_background_removal": (384, 256),  # the picture's own size, RGBA
    "qwen_image_21_masked_edit": (384, 256),  # the 2.1 edit of the crop stitched back into the example input
}
# examples whose result carries an alpha channel (saved as an RGBA PNG)
RGBA = ("qwen_image_21_background_removal", "qwen_image_layered")  # examples that save RGBA PNGs
# images a run saves when not one: the layered example saves each layer and the composite (1 + 1 on smoke
# weights, where its layers are lowered to 1 as the steps are)
EXPECTED_IMAGES = {"qwen_image_layered": 2}
# examples that repaint only Load Image's mask (1 - alpha) of this input: outside it the result is the input
MASKED_INPUT = ROOT / "workflows" / "inputs" / "qwenpix_example_masked.png"
MASKED = ("qwen_image_controlnet_inpaint", "qwen_image_edit_masked_crop_stitch", "qwen_image_21_masked_edit")
SMOKE_LAYERS = 1


@pytest.fixture(scope="module")
def models(example_models):
    return example_models


def _node(prompt: dict, *classes: str) -> tuple[str, dict]:
    return next((k, n) for k, n in prompt.items() if n["class_type"] in classes)


def _prepared(path: Path, tag: str, steps: int = 2) -> dict:
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        fixed = (node["class_type"], node["inputs"].get("schedule")) in FIXED_STEPS  # the 2.1 Turbo: its 8
        if node["class_type"] in SAMPLERS and not fixed:  # ours or the native KSampler
            node["inputs"]["steps"] = steps
        if node["class_type"] == "QwenPixLayeredSampler":
            node["inputs"]["layers"] = min(node["inputs"]["layers"], SMOKE_LAYERS)
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"test/{path.stem}_{tag}"
    return prompt


def test_every_shipped_workflow_has_an_expected_size():
    assert sorted(EXPECTED_SIZE) == [p.stem for p in API]


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_api_workflow_runs_and_reports_progress(models, client, path):
    prompt = _prepared(path, "run")
    res = client.run(prompt, timeout=900)
    assert res.status == "success", res.error()
    images = res.images()
    assert len(images) == EXPECTED_IMAGES.get(path.stem, 1), images
    for img in images:
        with Image.open(models.output_dir / img["subfolder"] / img["filename"]) as im:
            assert im.size == EXPECTED_SIZE[path.stem]
            assert (im.mode == "RGBA") == (path.stem in RGBA), im.mode
            if path.stem in MASKED:
                _assert_repainted_only_in_the_mask(im)
    sampler_id, sampler = _node(prompt, *SAMPLERS)
    progress = [e["data"] for e in res.events if e["type"] == "progress" and e["data"]["node"] == sampler_id]
    n = sampler["inputs"]["steps"]
    assert [(p["value"], p["max"]) for p in progress][-2:] == [(n - 1, n), (n, n)]
    # the examples use every input as intended: no warning for the user
    assert [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"] == []


def _assert_repainted_only_in_the_mask(im: Image.Image) -> None:
    with Image.open(MASKED_INPUT) as src:
        rgba = np.asarray(src.convert("RGBA")).astype(int)
    out, keep = np.asarray(im.convert("RGB")).astype(int), rgba[..., 3] == 255
    assert keep.any() and not keep.all()
    assert np.abs(out[keep] - rgba[..., :3][keep]).max() <= 1  # SaveImage truncates to 8 bits: off by one at most
    assert np.abs(out[~keep] - rgba[..., :3][~keep]).max() > 8  # the masked area was repainted (noise weights)


def test_interrupt_mid_sampling_then_next_prompt_succeeds(models, client):
    path = ROOT / "workflows" / "api" / "qwen_image_t2i.json"
    long = _prepared(path, "interrupted", steps=400)
    _, latent = _node(long, "QwenPixEmptyLatent")
    latent["inputs"].update(aspect="custom", width=256, height=256)
    sampler_id, _ = _node(long, "QwenPixSampler")
    pid = client.queue(long)

    def interrupt_after_first_step():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(e["type"] == "progress" and e["data"]["node"] == sampler_id for e in client.events_for(pid)):
                client.interrupt()
                return
            time.sleep(0.05)

    t = threading.Thread(target=interrupt_after_first_step)
    t.start()
    res = client.wait(pid, timeout=600)
    t.join()
    assert res.status == "interrupted"
    steps_done = max(e["data"]["value"] for e in res.events if e["type"] == "progress")
    assert steps_done < 400
    after = copy.deepcopy(long)
    _, sampler = _node(after, "QwenPixSampler")
    sampler["inputs"]["steps"] = 2
    _, save = _node(after, "SaveImage")
    save["inputs"]["filename_prefix"] = "test/after_interrupt"
    assert client.run(after, timeout=300).status == "success"
