"""Edit Encode's masked edit through the real ComfyUI server on the example workflows' smoke weights: Load Image
(its MASK is 1 - alpha) -> Edit Encode (mask, 'crop to mask') -> sampler -> decode -> Stitch Into Original (edited
+ Edit Encode's crop). The saved PNG equals the input PNG's bytes wherever the mask is 0 (uint8, tolerance 0) at
sizes that are not multiples of 16, for a rectangle, a soft disc, a corner and two blobs; 'whole image' too.
An empty mask keeps the picture (with a warning), a full mask repaints it all; a mask of another size, a stitch
without a mask and a 'crop like Picture 1' reference of another size are errors naming the input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tools.comfy_harness import ComfyClient

pytestmark = pytest.mark.e2e
DIT, TE, VAE = (  # the masked-edit example's files, staged as smoke weights by the example_models fixture
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    "qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "qwen_image_vae.safetensors",
)
SIZES = [(101, 75), (150, 47)]
SALT = itertools.count(1)


def alpha(kind: str, w: int, h: int) -> Image.Image:
    """The alpha channel of a test input: 0 (transparent) where Load Image's MASK repaints."""
    a = Image.new("L", (w, h), 255)
    d = ImageDraw.Draw(a)
    if kind == "rect":
        d.rectangle((w // 5, h // 4, w // 2, h // 2 + 3), fill=0)
    elif kind == "disc":  # soft edge: graded mask values
        d.ellipse((w // 3, h // 5, w // 3 + h // 2, h // 5 + h // 2), fill=0)
        a = a.filter(ImageFilter.GaussianBlur(3))
    elif kind == "corner":
        d.rectangle((w - 9, 0, w, 6), fill=0)
    elif kind == "blobs":  # two areas far apart: one box around both
        d.ellipse((2, 2, 14, 12), fill=0)
        d.ellipse((w - 20, h - 15, w - 4, h - 3), fill=0)
    elif kind == "full":
        d.rectangle((0, 0, w, h), fill=0)
    return a


def write_input(comfy, kind: str, w: int, h: int) -> str:
    rgb = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(rgb).convert("RGBA")
    im.putalpha(alpha(kind, w, h))
    name = f"qp_editcrop_{kind}_{w}x{h}.png"
    im.save(comfy.input_dir / name)
    return name


def branch(p: str, image: str, mode: str = "crop to mask", mask=None, extra=None) -> dict:
    """Nodes <p>img .. <p>save: one masked edit of `image` (mask: Load Image's own unless given)."""
    enc = {
        "text_encoder": ["te", 0], "vae": ["vae", 0], "prompt": f"make it bronze {next(SALT)}",
        "image1": [f"{p}img", 0], "variant": "edit_plus (2509 / 2511)", "resize": "keep size (no shift/zoom)",
        "mask": mask or [f"{p}img", 1], "mask_mode": mode, "padding": 8, "megapixels": 0.0625, **(extra or {}),
    }  # fmt: skip
    return {
        f"{p}img": {"class_type": "LoadImage", "inputs": {"image": image}},
        f"{p}enc": {"class_type": "QwenPixEditEncode", "inputs": enc},
        f"{p}k": {"class_type": "QwenPixSampler", "inputs": {
            "dit": ["dit", 0], "positive": [f"{p}enc", 0], "negative": [f"{p}enc", 0],
            "latent_image": [f"{p}enc", 1], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "schedule": "shift (ComfyUI workflows)", "shift": 3.0, "cfg_rescale": "none", "denoise": 1.0}},
        f"{p}dec": {"class_type": "QwenPixDecode", "inputs": {
            "vae": ["vae", 0], "samples": [f"{p}k", 0], "tiling": "auto", "tile_size": 512, "overlap": 64}},
        f"{p}stitch": {"class_type": "QwenPixMaskStitch", "inputs": {"edited": [f"{p}dec", 0], "crop": [f"{p}enc", 2]}},
        f"{p}save": {"class_type": "SaveImage", "inputs": {"images": [f"{p}stitch", 0], "filename_prefix": f"t/{p}"}},
    }  # fmt: skip


def loaders() -> dict:
    return {
        "dit": {"class_type": "QwenPixDiTLoader", "inputs": {"dit_name": DIT, "compute_dtype": "auto",
                                                             "positions": "official (diffusers)"}},
        "te": {"class_type": "QwenPixTextEncoderLoader", "inputs": {"text_encoder_name": TE}},
        "vae": {"class_type": "QwenPixVAELoader", "inputs": {"vae_name": VAE}},
    }  # fmt: skip


def saved(comfy, res, p: str) -> np.ndarray:
    (img,) = res.outputs[f"{p}save"]["images"]
    with Image.open(comfy.output_dir / img["subfolder"] / img["filename"]) as im:
        return np.asarray(im.convert("RGB"))


def source(comfy, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB bytes, mask > 0) of an input PNG, the mask as Load Image makes it (1 - alpha)."""
    with Image.open(comfy.input_dir / name) as im:
        rgba = np.asarray(im)
    return rgba[..., :3], rgba[..., 3] < 255


@pytest.fixture(scope="module")
def masked_runs(example_models):
    comfy = example_models
    prompt, cases = loaders(), {}
    # each shape once, each size twice (tests/test_inpaint_nodes.py runs every size x shape in-process)
    for (w, h), kind in [(SIZES[0], "rect"), (SIZES[0], "disc"), (SIZES[1], "corner"), (SIZES[1], "blobs")]:
        p = f"{kind}{w}_"
        cases[p] = write_input(comfy, kind, w, h)
        prompt.update(branch(p, cases[p]))
    p = "whole_"
    cases[p] = write_input(comfy, "disc", 101, 75)
    prompt.update(branch(p, cases[p], mode="whole image"))
    client = ComfyClient(comfy.url).connect()
    try:
        res = client.run(prompt, timeout=600)
    finally:
        client.close()
    assert res.status == "success", res.error()
    return comfy, res, cases


def test_pixels_outside_the_mask_keep_their_bytes(masked_runs):
    comfy, res, cases = masked_runs
    for p, name in cases.items():
        out = saved(comfy, res, p)
        src, m = source(comfy, name)
        assert out.shape == src.shape, p
        assert np.array_equal(out[~m], src[~m]), p  # tolerance 0 on uint8 outside the mask
        assert (out[m] != src[m]).any(), p  # the edit arrived inside it


def test_empty_and_full_masks(example_models, client):
    comfy = example_models
    empty, full = write_input(comfy, "none", 101, 75), write_input(comfy, "full", 101, 75)
    prompt = {**loaders(), **branch("e_", empty), **branch("f_", full)}
    res = client.run(prompt, timeout=300)
    assert res.status == "success", res.error()
    src, _ = source(comfy, empty)
    assert np.array_equal(saved(comfy, res, "e_"), src)  # empty: nothing repainted
    warned = [e["data"]["message"] for e in res.events if e["type"] == "qwenpix.warning"]
    assert any("mask is empty" in m for m in warned), warned
    src, _ = source(comfy, full)
    out = saved(comfy, res, "f_")
    assert out.shape == src.shape and (out != src).mean() > 0.5  # full: the whole picture is the edit's


def _fails(client, prompt, node, *texts):
    res = client.run(prompt, timeout=300)
    assert res.status == "error", res.status
    err = res.error()
    assert err["node_id"] == node, err
    for text in texts:
        assert text in err["exception_message"], err["exception_message"]


def test_bad_masks_are_named(example_models, client):
    comfy = example_models
    a, b = write_input(comfy, "rect", 101, 75), write_input(comfy, "rect", 150, 47)
    prompt = {**loaders(), **branch("x_", a, mask=["other", 1]), "other": {"class_type": "LoadImage",
                                                                           "inputs": {"image": b}}}  # fmt: skip
    _fails(client, prompt, "x_enc", "mask is 150x47 pixels; the image is 101x75")
    prompt = {**loaders(), **branch("r_", a, extra={"image2": ["other", 0], "references": "crop like Picture 1"}),
              "other": {"class_type": "LoadImage", "inputs": {"image": b}}}  # fmt: skip
    _fails(client, prompt, "r_enc", "image2 is 150x47 pixels", "crop like Picture 1")
    prompt = {**loaders(), **branch("n_", a)}
    del prompt["n_enc"]["inputs"]["mask"]
    _fails(client, prompt, "n_stitch", "crop: the Edit Encode it comes from has no mask")
