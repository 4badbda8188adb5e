"""ControlNet text-to-image against diffusers' QwenImageControlNetPipeline (one Union ControlNet; several images
through QwenImageMultiControlNetModel) and QwenImageControlNetInpaintPipeline on tiny random models sharing their
weights (the repo of tests/test_pipeline.py plus a ControlNet folder): final images within 1e-4, float32."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_pipeline_repo import diffusers_components, picture, write_repo

from qwen_image_core import control
from qwen_image_core.controlnet import load_controlnet
from qwen_image_core.pipeline import QwenImagePipeline
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as Q

ATOL = 1e-4
STEPS = 4
W, H = 96, 64


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnrepo")
    te = write_repo(root)
    net_cfg = D.tiny_config(text_dim=Q.TINY_TEXT["hidden_size"], num_layers=1)
    C.write_diffusers(root / "cn_union", net_cfg, seed=7)
    C.write_instantx(root / "cn_inpaint.safetensors", net_cfg, seed=8, dtype=torch.float32, extra_channels=4)
    return root, te


@pytest.fixture(scope="module")
def ours(repo):
    return QwenImagePipeline.from_folder(repo[0])


@pytest.fixture(scope="module")
def components(repo):
    return diffusers_components(*repo)


def ref_net(root, name):
    from diffusers import QwenImageControlNetModel

    if name == "cn_union":
        return QwenImageControlNetModel.from_pretrained(root / name).eval()
    conf = {k: v for k, v in C.config_json(load_controlnet(root / name).config, 4).items() if not k.startswith("_")}
    m = QwenImageControlNetModel(**conf)
    m.load_state_dict(C.state_dict(load_controlnet(root / name).config, 8, 4))
    return m.eval()


def check(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.float() - ref.float()).abs().max().item()
    print(f"max abs diff {err:.3g}")
    assert err <= ATOL, f"max abs diff {err:.3g} > {ATOL}"


def test_union_controlnet_matches_diffusers(repo, ours, components):
    from diffusers import QwenImageControlNetPipeline as Ref

    root, _ = repo
    hint = picture(120, 80, 1)  # resized to the output size, as the reference does
    kw = dict(negative_prompt="blurry", width=W, height=H, num_inference_steps=STEPS, true_cfg_scale=4.0)
    want = Ref(**components, controlnet=ref_net(root, "cn_union"))(
        "a house", control_image=hint, controlnet_conditioning_scale=0.8, control_guidance_start=0.25,
        control_guidance_end=1.0, output_type="pt", generator=torch.Generator().manual_seed(3), **kw,
    ).images  # fmt: skip
    net = load_controlnet(root / "cn_union")
    spec = control.ControlImage(net, hint, strength=0.8, start=0.25, end=1.0)
    got = control.generate(ours, "a house", [spec], "blurry", width=W, height=H, steps=STEPS, cfg_scale=4.0, seed=3)
    check(got, want)
    plain = ours.generate("a house", "blurry", width=W, height=H, steps=STEPS, cfg_scale=4.0, seed=3)
    assert (got - plain).abs().max() > 1e-3  # the ControlNet did something


def test_one_union_net_on_two_images_matches_diffusers_multi(repo, ours, components):
    from diffusers import QwenImageControlNetPipeline as Ref
    from diffusers import QwenImageMultiControlNetModel

    root, _ = repo
    hints = [picture(W, H, 2), picture(W, H, 3)]
    multi = QwenImageMultiControlNetModel([ref_net(root, "cn_union")])
    want = Ref(**components, controlnet=multi)(
        "a road", control_image=hints, controlnet_conditioning_scale=[0.6, 1.1], control_guidance_start=[0.0, 0.5],
        control_guidance_end=[0.75, 1.0], width=W, height=H, num_inference_steps=STEPS, true_cfg_scale=1.0,
        output_type="pt", generator=torch.Generator().manual_seed(4),
    ).images  # fmt: skip
    net = load_controlnet(root / "cn_union")
    specs = [control.ControlImage(net, hints[0], 0.6, 0.0, 0.75), control.ControlImage(net, hints[1], 1.1, 0.5, 1.0)]
    got = control.generate(ours, "a road", specs, width=W, height=H, steps=STEPS, cfg_scale=1.0, seed=4)
    check(got, want)


def test_inpainting_controlnet_matches_diffusers(repo, ours, components):
    from diffusers import QwenImageControlNetInpaintPipeline as Ref

    root, _ = repo
    image = picture(W, H, 5)
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (20, 8, 70, 40))
    ref = Ref(**components, controlnet=ref_net(root, "cn_inpaint.safetensors"))
    torch.manual_seed(11)  # diffusers samples the masked image's latent from the global generator
    want = ref(
        "a cat", negative_prompt=" ", control_image=image, control_mask=mask, controlnet_conditioning_scale=1.0,
        width=W, height=H, num_inference_steps=STEPS, true_cfg_scale=4.0, output_type="pt",
        generator=torch.Generator().manual_seed(6),
    ).images  # fmt: skip
    net = load_controlnet(root / "cn_inpaint.safetensors")
    assert net.kind == "inpaint"
    torch.manual_seed(11)
    spec = control.ControlImage(net, image, mask=mask)
    got = control.generate(ours, "a cat", [spec], " ", width=W, height=H, steps=STEPS, cfg_scale=4.0, seed=6)
    check(got, want)


def test_masks_are_checked(repo, ours):
    root, _ = repo
    net = load_controlnet(root / "cn_inpaint.safetensors")
    union = load_controlnet(root / "cn_union")
    image = picture(W, H, 5)
    with pytest.raises(ValueError, match="needs a mask"):
        control.generate(ours, "x", [control.ControlImage(net, image)], width=W, height=H, steps=1)
    with pytest.raises(ValueError, match="takes no mask"):
        control.generate(ours, "x", [control.ControlImage(union, image, mask=torch.ones(1, H, W))], width=W, height=H)
    with pytest.raises(ValueError, match="mask is 32x32 pixels"):
        control.generate(ours, "x", [control.ControlImage(net, image, mask=torch.ones(1, 32, 32))], width=W, height=H)
