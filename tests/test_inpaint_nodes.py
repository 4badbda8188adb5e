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
        (out,) = N.QwenPixMaskStitch().stitch(1 - crop, info, image, m[None])  # "edit": invert the crop
        assert out.shape == image.shape
        keep = (m == 0)[None].expand(batch, -1, -1)
        assert torch.equal(out[keep], image[keep]), name  # tolerance 0
        assert (out[~keep] != image[~keep]).any(), name


def test_empty_mask_keeps_everything():
    image = torch.rand(1, 40, 50, 3)
    crop, _, info = N.QwenPixMaskCrop().crop(image, torch.zeros(1, 40, 50), 8, 1.0)
    (out,) = N.QwenPixMaskStitch().stitch(crop * 0, info, image, torch.zeros(1, 40, 50))
    assert torch.equal(out, image)


def test_bad_masks_are_named():
    image = torch.rand(2, 40, 50, 3)
    with pytest.raises(InputError, match="mask is 30x20 pixels"):
        N.QwenPixMaskCrop().crop(image, torch.ones(1, 20, 30), 8, 1.0)
    with pytest.raises(InputError, match="mask has a batch of 3"):
        N.QwenPixMaskCrop().crop(image, torch.ones(3, 40, 50), 8, 1.0)
    _, _, info = N.QwenPixMaskCrop().crop(image, torch.ones(1, 40, 50), 8, 1.0)
    with pytest.raises(InputError, match="crop: made for"):
        N.QwenPixMaskStitch().stitch(image, info, torch.rand(1, 41, 50, 3), torch.ones(1, 41, 50))


def two_blobs(h, w):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy - 4) ** 2 + (xx - 5) ** 2 < 16) | ((yy - h + 6) ** 2 + (xx - w + 8) ** 2 < 20)).float()


@pytest.mark.parametrize(("h", "w"), [(75, 101), (47, 150)])
def test_edit_encode_crop_then_stitch_keeps_unmasked_bytes(h, w):
    """Edit Encode's crop (`edit_crop`) -> an "edit" of the crop -> Stitch with only edited + crop: uint8 bytes
    (the IMAGE as Load Image makes it, k / 255) unchanged where the mask is 0, references cropped alike."""
    g = torch.Generator().manual_seed(w)
    image = torch.randint(0, 256, (1, h, w, 3), generator=g).float() / 255
    aligned = torch.rand(1, h, w, 3, generator=g)  # a map of Picture 1 (same size)
    other = torch.rand(1, 30, 40, 3, generator=g)  # another picture
    for name, m in {**masks(h, w), "blobs": two_blobs(h, w)}.items():
        for refs in N.REFERENCE_MODES:
            pics = [("image1", image), ("image2", aligned)] + ([("image3", other)] if refs == "whole" else [])
            named, crop = N.edit_crop(pics, m[None], "crop to mask", 8, 0.0625, refs)
            first, second = named[0][1], named[1][1]
            assert first.shape[1] % 16 == 0 and first.shape[2] % 16 == 0 and first.shape[1:3] != image.shape[1:3]
            assert second.shape == (first.shape if refs != "whole" else aligned.shape), (name, refs)
            if refs == "whole":
                assert named[2][1] is other
            (out,) = N.QwenPixMaskStitch().stitch(1 - first, crop)
            to_bytes = lambda t: (t * 255).round().to(torch.uint8)  # noqa: E731 (what SaveImage writes)
            keep = (m == 0)[None]
            assert torch.equal(to_bytes(out)[keep], to_bytes(image)[keep]), name  # tolerance 0
            assert (out[~keep] != image[~keep]).any(), name


def test_edit_encode_masks_whole_image_empty_and_bad(monkeypatch):
    warned = []
    monkeypatch.setattr(N.notices, "warn", warned.append)  # in-process: no server to show it
    image = torch.rand(1, 40, 50, 3)
    m = torch.zeros(1, 40, 50)
    m[:, 5:9, 7:20] = 1
    named, crop = N.edit_crop([("image1", image)], m, "whole image")
    assert named[0][1] is image and crop["box"] == (0, 0, 50, 40)  # whole image: no crop, stitch the mask only
    (out,) = N.QwenPixMaskStitch().stitch(image * 0, crop)
    assert torch.equal(out[0][m[0] == 0], image[0][m[0] == 0]) and (out[0][m[0] > 0] == 0).all()
    named, crop = N.edit_crop([("image1", image)], torch.zeros(1, 40, 50))  # empty: whole, stitched back as is
    assert named[0][1] is image and "mask is empty" in warned[0]
    assert torch.equal(N.QwenPixMaskStitch().stitch(image * 0, crop)[0], image)
    assert N.edit_crop([("image1", image)], None) == ([("image1", image)], None)  # no mask: no crop record
    with pytest.raises(InputError, match="mask is 30x20 pixels"):
        N.edit_crop([("image1", image)], torch.ones(1, 20, 30))
    with pytest.raises(InputError, match="mask has a batch of 2"):
        N.edit_crop([("image1", image)], torch.ones(2, 40, 50))
    with pytest.raises(InputError, match="image2 is 40x30 pixels"):
        N.edit_crop([("image1", image), ("image2", torch.rand(1, 30, 40, 3))], m, references="crop like Picture 1")
    with pytest.raises(InputError, match="crop: the Edit Encode it comes from has no mask"):
        N.QwenPixMaskStitch().stitch(image, None)
    with pytest.raises(InputError, match="original: not connected"):
        N.QwenPixMaskStitch().stitch(image, N.QwenPixMaskCrop().crop(image, m, 8, 1.0)[2])


def test_edit_encode_mask_of_a_batch():
    """Edit Encode takes the first image of a batch: a mask batch of 1 or Picture 1's, its first mask used."""
    image = torch.rand(3, 40, 50, 3)
    m = torch.zeros(3, 40, 50)
    m[0, 5:9, 7:20] = 1
    m[1:, 30:, 40:] = 1  # the other images' masks do not count
    named, crop = N.edit_crop([("image1", image)], m, padding=0, megapixels=0.0625)
    assert crop["box"] == (7, 5, 20, 9) and crop["original"].shape[0] == 1 and named[0][1].shape[0] == 1
