"""The InstantX Qwen-Image ControlNet (Union, Inpainting) against diffusers' QwenImageControlNetModel on tiny random
weights in the real layouts (ComfyUI single file, fp8, diffusers folder), the residual hook against diffusers'
QwenImageTransformer2DModel(controlnet_block_samples=...), and refusals of files of other families."""

from __future__ import annotations

import pytest
import torch

import oracles
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.control import Control, ControlledDenoiser, residual_hook
from qwen_image_core.controlnet import load_controlnet
from qwen_image_core.mmdit import MMDiT, patchify, unpatchify
from qwen_image_core.sampling import CFGDenoiser
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D
from tools.checkpoints.dit import write_safetensors

CFG = D.tiny_config(num_layers=3)  # the DiT
NET = D.tiny_config(num_layers=2)  # its ControlNet: fewer blocks (interval ceil(3 / 2) = 2)


def diffusers_net(extra: int, sd):
    from diffusers import QwenImageControlNetModel

    conf = {k: v for k, v in C.config_json(NET, extra).items() if not k.startswith("_")}
    m = QwenImageControlNetModel(**conf)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def diffusers_residuals(m, img, sigma, txt, control, scale=1.0):
    x, (h, w) = patchify(img, 2)
    c, _ = patchify(control, 2)
    with torch.no_grad():
        return m(
            hidden_states=x, controlnet_cond=c, conditioning_scale=scale, encoder_hidden_states=txt,
            encoder_hidden_states_mask=torch.ones(txt.shape[:2]), timestep=sigma, img_shapes=[[(1, h, w)]] * len(img),
            return_dict=False,
        )  # fmt: skip


@pytest.mark.parametrize("extra", [0, 4], ids=["union", "inpaint"])
@pytest.mark.parametrize("layout", ["comfy", "diffusers", "fp8"])
def test_residuals_match_diffusers(tmp_path, extra, layout):
    if layout == "comfy":
        path = C.write_instantx(tmp_path / "cn.safetensors", NET, seed=3, dtype=torch.float32, extra_channels=extra)
    elif layout == "diffusers":
        path = C.write_diffusers(tmp_path / "cn", NET, seed=3, extra_channels=extra)
    else:
        path = C.write_instantx(
            tmp_path / "cn.safetensors", NET, seed=3, dtype=torch.float32, extra_channels=extra,
            linear_dtype=torch.float8_e4m3fn,
        )  # fmt: skip
    ours = load_controlnet(path)
    assert ours.kind == ("union" if extra == 0 else "inpaint") and ours.control_channels == 16 + extra // 4
    if layout == "fp8":
        assert any(p.dtype == torch.float8_e4m3fn for p in ours.parameters())
    sd = C.state_dict(NET, 3, extra)
    if layout == "fp8":  # the reference gets the weights the file means
        sd = {k: v.to(torch.float8_e4m3fn).float() if D.is_linear_weight(k, v.shape) else v for k, v in sd.items()}
    ref = diffusers_net(extra, sd)
    img, sigma, txt = oracles.inputs(b=2, h=8, w=12, L=5)
    control = torch.randn(2, ours.control_channels, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(img, sigma, txt, control)
    want = diffusers_residuals(ref, img, sigma, txt, control)
    assert len(got) == len(want) == NET.num_layers
    for g, w in zip(got, want, strict=True):
        oracles.assert_close(g, w)


def test_hook_matches_diffusers_dit_with_block_samples(tmp_path):
    """Residuals of two nets (strengths 0.7 and 0.4) through our hook == diffusers' DiT given their sum."""
    dit_sd = D.state_dict(CFG, seed=1)
    ours = MMDiT(CFG)
    ours.load_state_dict(dit_sd)
    ref = oracles.diffusers_dit(CFG, dit_sd)
    img, sigma, txt = oracles.inputs(b=1, h=8, w=12, L=5)
    g = torch.Generator().manual_seed(2)
    res = [[torch.randn(1, 24, CFG.hidden, generator=g) for _ in range(2)] for _ in range(2)]
    controls = [Control(None, torch.zeros(1), 0.7), Control(None, torch.zeros(1), 0.4)]
    with torch.no_grad():
        got = ours(img, sigma, txt, block_hook=residual_hook(controls, res, CFG.num_layers))
        x, (h, w) = patchify(img, 2)
        samples = [0.7 * a + 0.4 * b for a, b in zip(*res, strict=True)]
        out = ref(
            hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=torch.ones(1, 5), timestep=sigma,
            img_shapes=[[(1, h, w)]], controlnet_block_samples=samples, return_dict=False,
        )[0]  # fmt: skip
    oracles.assert_close(got, unpatchify(out, (h, w), 2, img.shape[-2:]))


def test_start_end_fractions_follow_diffusers():
    c = Control(None, torch.zeros(1), 1.0, start=0.3, end=0.8)
    assert [c.active(i, 10) for i in range(10)] == [i / 10 >= 0.3 and (i + 1) / 10 <= 0.8 for i in range(10)]
    with pytest.raises(ValueError, match="start"):
        Control(None, torch.zeros(1), 1.0, start=0.9, end=0.1)


def test_inactive_controlnet_is_not_run():
    calls = []

    class Net:
        def __call__(self, *a, **k):
            calls.append(1)
            return [torch.zeros(1, 1, 1)]

    inner = CFGDenoiser(lambda x, s, *a, **k: torch.zeros_like(x), scale=1.0)
    d = ControlledDenoiser(inner, [Control(Net(), torch.zeros(1), 1.0, 0.0, 0.5)], torch.tensor([1.0, 0.5, 0.0]), 2)
    x = torch.zeros(1, 16, 2, 2)
    d(x, torch.tensor([1.0]), torch.zeros(1, 3, 4))
    d(x, torch.tensor([0.5]), torch.zeros(1, 3, 4))
    assert len(calls) == 1


def _write(path, keys):
    write_safetensors(path, [(k, (4, 4), torch.float32, lambda: torch.zeros(4, 4)) for k in keys])
    return path


@pytest.mark.parametrize(
    ("keys", "what"),
    [
        (["controlnet_x_embedder.weight", "x_embedder.weight", "controlnet_blocks.0.weight",
          "controlnet_single_blocks.0.weight"], "Flux ControlNet"),
        (["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "SDXL ControlNet"),
        (["input_hint_block.0.weight", "zero_convs.0.0.weight"], "SDXL ControlNet"),
        (["img_in.weight", "controlnet_blocks.0.y_rms.weight"], "DiffSynth blockwise ControlNet"),
        (["txt_norm.weight", "img_in.weight", "txt_in.weight", "proj_out.weight"], "diffusion model"),
        (["foo.weight"], "not an InstantX"),
    ],
    ids=["flux", "sdxl-diffusers", "sdxl-ldm", "diffsynth", "dit", "unknown"],
)  # fmt: skip
def test_other_families_are_named(tmp_path, keys, what):
    with pytest.raises(CheckpointError, match=what) as e:
        load_controlnet(_write(tmp_path / "x.safetensors", keys))
    assert "x.safetensors" in str(e.value)


def test_unknown_control_width_is_refused(tmp_path):
    path = C.write_instantx(tmp_path / "cn.safetensors", NET, extra_channels=8)
    with pytest.raises(CheckpointError, match="72 channels"):
        load_controlnet(path)


def test_control_latent_of_wrong_size_is_refused(tmp_path):
    net = load_controlnet(C.write_instantx(tmp_path / "cn.safetensors", NET, dtype=torch.float32))
    img, sigma, txt = oracles.inputs(h=8, w=12, L=5)
    with pytest.raises(ValueError, match="control latent of 16 channels"):
        net(img, sigma, txt, torch.zeros(1, 16, 4, 4))
