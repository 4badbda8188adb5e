"""The crop-and-stitch nodes in-process (ComfyUI's modules imported, no server): the stitched image equals the
original exactly where the mask is 0 (float IMAGE, sizes not multiples of 16, several masks, batches), the crop
has sides multiples of 16, and masks of the wrong size or batch are errors naming the input."""

from __future__ import annotations

import importlib

import pytest
import torch

from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()


import_pack()
N = importlib.import_module("qwenpix.nodes.inpaint")
InputError = importlib.import_module("qwenpix.nodes.checks").InputError


def masks(h, w):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rect = ((yy > h // 4) & (yy < h // 2) & (xx > 3) & (xx < w // 3)).float()
    disc = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2).float() * 0.6  # soft
    corner = ((yy < 5) & (xx > w - 7)).float()
    return {"rect": rect, "disc": disc, "corner": corner}


@pytest.mark.parametrize(("h", "w", "batch"), [(75, 101, 1), (47, 150, 2)])
def test_crop_edit_stitch_keeps_unmasked_values_exactly(h, w, batch):
    image = torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(h))
    for name, m in masks(h, w).items():
        crop, crop_mask, info = N.QwenPixMaskCrop().crop(image, m[None], 8, 0.0625)
        assert crop.shape[1] % 16 == 0 and crop.shape[2] % 16 == 0 and crop_mask.shape[1:] == crop.shape[1:3]
        (out,) = N.QwenPixMaskStitch().stitch(image, 1 - crop, m[None], info)  # "edit": invert the crop
        assert out.shape == image.shape
        keep = (m == 0)[None].expand(batch, -1, -1)
        assert torch.equal(out[keep], image[keep]), name  # tolerance 0
        assert (out[~keep] != image[~keep]).any(), name


def test_empty_mask_keeps_everything():
    image = torch.rand(1, 40, 50, 3)
    crop, _, info = N.QwenPixMaskCrop().crop(image, torch.zeros(1, 40, 50), 8, 1.0)
    (out,) = N.QwenPixMaskStitch().stitch(image, crop * 0, torch.zeros(1, 40, 50), info)
    assert torch.equal(out, image)


def test_bad_masks_are_named():
    image = torch.rand(2, 40, 50, 3)
    with pytest.raises(InputError, match="mask is 30x20 pixels"):
        N.QwenPixMaskCrop().crop(image, torch.ones(1, 20, 30), 8, 1.0)
    with pytest.raises(InputError, match="mask has a batch of 3"):
        N.QwenPixMaskCrop().crop(image, torch.ones(3, 40, 50), 8, 1.0)
    _, _, info = N.QwenPixMaskCrop().crop(image, torch.ones(1, 40, 50), 8, 1.0)
    with pytest.raises(InputError, match="crop: made for"):
        N.QwenPixMaskStitch().stitch(torch.rand(1, 41, 50, 3), image, torch.ones(1, 41, 50), info)
