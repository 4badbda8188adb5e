"""Qwen-Image-2.1 prompt templates and reference preparation against diffusers 0.42.1's qwenimage21 blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_core.qwen21 import prompts as P


def rgba_image(h=70, w=110, seed=0) -> Image.Image:
    a = np.random.RandomState(seed).randint(0, 256, (h, w, 4), dtype=np.uint8)
    a[:, : w // 3, 3] = 0  # transparent, translucent and opaque columns
    a[:, w // 3 : 2 * w // 3, 3] = 128
    a[:, 2 * w // 3 :, 3] = 255
    return Image.fromarray(a, "RGBA")


def test_template_is_the_reference_one_with_image_addressing():
    t2i = P.template_text("a cat")
    assert t2i == (
        "<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    )
    three = P.template_text("swap <image1> and <image3>", 3)
    slots = " ".join(f"<image{i}><|vision_start|><|image_pad|><|vision_end|>" for i in (1, 2, 3))
    assert three == t2i.replace("a cat", slots + "swap <image1> and <image3>")
    assert P.template_text("") == P.template_text(" ")  # the reference's rule for empty prompts
    assert P.template_text("x", 10).count("<|image_pad|>") == 10
    with pytest.raises(ValueError, match="at most 10 reference images"):
        P.template_text("x", 11)


def test_rgba_wrapper():
    wrapped = P.rgba_prompt("a glass bottle")
    assert wrapped.startswith("This is an RGBA image with transparency. a glass bottle")
    assert wrapped.endswith("The image has alpha channel and the background is transparent.")


def test_resize_and_vl_copy_match_diffusers():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines.qwenimage21.encoders import calculate_dimensions

    img = rgba_image()
    for resolution in (64, 96, 1024):
        w, h, _ = calculate_dimensions(resolution * resolution, img.width / img.height)
        expected = VaeImageProcessor(vae_scale_factor=16).resize(img, height=h, width=w)
        ours = P.official_resize(img, resolution)
        assert ours.mode == "RGBA" and ours.size == expected.size
        assert np.array_equal(np.asarray(ours), np.asarray(expected))
    white = Image.new("RGB", img.size, (255, 255, 255))
    white.paste(img, mask=img.getchannel("A"))  # what the reference's text encoder sees
    assert np.array_equal(np.asarray(P.vl_copy(img)), np.asarray(white))
    assert P.vl_copy(img.convert("RGB")).mode == "RGB"


def test_tensors_keep_their_alpha():
    img = rgba_image(32, 48, 1)
    t = torch.from_numpy(np.asarray(img).astype(np.float32) / 255)  # a ComfyUI-style [H, W, 4] in [0, 1]
    assert np.array_equal(np.asarray(P.to_pil_rgba(t)), np.asarray(img))
    assert np.array_equal(np.asarray(P.vl_copy(t[None])), np.asarray(P.vl_copy(img)))
    assert np.asarray(P.to_pil_rgba(t[..., :3]))[..., 3].min() == 255  # RGB: opaque


def test_pad_to_multiple_keeps_every_pixel_in_place():
    img = rgba_image(70, 110, 2)
    padded, size = P.pad_to_multiple(img)
    assert size == (110, 70) and padded.size == (128, 96) and padded.mode == "RGBA"
    a, b = np.asarray(padded), np.asarray(img)
    assert np.array_equal(a[:70, :110], b)  # the image itself, unshifted
    assert np.array_equal(a[70:, :110], np.repeat(b[-1:], 26, 0)) and np.array_equal(
        a[:70, 110:], np.repeat(b[:, -1:], 18, 1)
    )
    assert P.pad_to_multiple(padded)[0].size == (128, 96)  # already a multiple: unchanged
