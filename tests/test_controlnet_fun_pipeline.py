"""Fun ControlNet text-to-image and inpainting with the core pipeline on the tiny repo (tests/tiny_pipeline_repo.py).

VideoX-Fun's QwenImageControlPipeline cannot run here (not installed, needs its own package), so: by construction
a Fun net with zero output projections gives `QwenImagePipeline.generate`'s image exactly (same seed: the
contexts draw nothing); a random one changes it; the control context is checked against the facts computed by
hand with the pipeline's VAE (posterior mean, normalised; repaint pixels 0 before encoding; 1 - mask nearest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_pipeline_repo import picture, write_repo

from qwen_image_core import control_fun
from qwen_image_core.control import pixels
from qwen_image_core.controlnet_fun import load_fun_controlnet
from qwen_image_core.pipeline import QwenImagePipeline
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D
from tools.checkpoints import qwen_vl as Q

W, H, STEPS = 64, 48, 2
DIT = D.tiny_config(text_dim=Q.TINY_TEXT["hidden_size"])  # the repo's DiT (2 blocks)
FUN = C.fun_config(DIT, num_blocks=2, injection_layers=(0, 1))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("funrepo")
    write_repo(root)
    C.write_fun(root / "fun.safetensors", FUN, seed=7, dtype=torch.float32)
    C.write_fun(root / "fun0.safetensors", FUN, seed=8, dtype=torch.float32, zero_after=True)
    p = QwenImagePipeline.from_folder(root)
    return p, load_fun_controlnet(root / "fun.safetensors"), load_fun_controlnet(root / "fun0.safetensors")


ARGS = dict(prompt="a red cube", negative_prompt=" ", width=W, height=H, steps=STEPS, cfg_scale=4.0, seed=3)


@pytest.fixture(scope="module")
def plain(pipe):
    with torch.no_grad():
        return pipe[0].generate(**ARGS)


def run(p, controls):
    with torch.no_grad():
        return control_fun.generate(p, controls=controls, **ARGS)


def test_zero_output_projections_give_the_plain_pipeline_exactly(pipe, plain):
    p, _, zero = pipe
    assert torch.equal(run(p, [control_fun.FunControlImage(zero, picture(W, H, 1), strength=0.9)]), plain)


def test_a_random_net_acts_and_inpaint_mode_runs(pipe, plain):
    p, net, _ = pipe
    fun = run(p, [control_fun.FunControlImage(net, picture(W, H, 1), strength=0.8)])
    assert (fun - plain).abs().max() > 1e-3
    mask = torch.zeros(1, 1, H, W)
    mask[..., :, : W // 2] = 1.0
    spec = control_fun.FunControlImage(net, picture(W, H, 1), 0.8, mask=mask, inpaint=picture(W, H, 2))
    both = run(p, [spec, control_fun.FunControlImage(net, picture(W, H, 3), 0.3, start=0.3)])
    assert torch.isfinite(both).all() and (both - fun).abs().max() > 1e-3


def test_control_context_follows_the_facts(pipe):
    p, net, _ = pipe
    mask = torch.zeros(1, 1, H, W)
    mask[..., : H // 2, :] = 1.0  # repaint the top half
    spec = control_fun.FunControlImage(net, picture(W, H, 1), mask=mask, inpaint=picture(W, H, 2))
    with torch.no_grad():
        ctx = control_fun.fun_context(p, spec, W, H, batch=1)
        control = p.encode_images(pixels(picture(W, H, 1), W, H), sample=False)
        inpaint = p.encode_images(pixels(picture(W, H, 2), W, H) * (1 - mask), sample=False)
    assert ctx.shape == (1, 33, H // 8, W // 8)
    assert torch.equal(ctx[:, :16], control) and torch.equal(ctx[:, 17:], inpaint)
    assert torch.equal(ctx[:, 16:17], 1 - F.interpolate(mask, size=(H // 8, W // 8), mode="nearest"))
    with pytest.raises(ValueError, match="takes both the mask and the image"):
        control_fun.fun_context(p, control_fun.FunControlImage(net, picture(W, H, 1), mask=mask), W, H, 1)
