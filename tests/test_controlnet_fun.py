"""The Fun Qwen-Image ControlNet Union (VideoX-Fun, 2512) on tiny random weights in the published layout.

No reference implementation runs here (ComfyUI 0.3.75 predates it; diffusers has none; VideoX-Fun and newer
ComfyUI are not installed), so the oracle is written from the facts in `qwen_image_core/controlnet_fun.py`'s
docstring on ComfyUI 0.3.75's own Qwen-Image pieces: its QwenImageTransformer2DModel (input layers, RoPE, the
ControlNet residual add after each block) and QwenImageTransformerBlock for the control blocks. Also by
construction: zero after_proj gives the plain DiT exactly; strength scales the hints; refusals."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.control_fun import FunControl, FunForward, hint_hook
from qwen_image_core.controlnet_fun import context_latent, load_fun_controlnet
from qwen_image_core.formats import controlnet_fun as fun_format
from qwen_image_core.mmdit import MMDiT
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D
from tools.checkpoints.dit import write_safetensors

CFG = D.tiny_config(num_layers=3)  # the DiT
FUN = C.fun_config(CFG, num_blocks=2, injection_layers=(0, 2))  # hints after DiT blocks 0 and 2


def dit():
    m = MMDiT(CFG)
    m.load_state_dict(D.state_dict(CFG, 2))
    return m.eval()


def inputs(b=1, seed=0, h=8, w=12):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(b, 16, h, w, generator=g), torch.randn(b, 7, CFG.text_dim, generator=g)
    return img, torch.full((b,), 0.7), txt, torch.randn(b, 33, h, w, generator=g)


def comfy_oracle(sd_dit, sd_fun, img, sigma, txt, context, strength=1.0):
    """ComfyUI 0.3.75's Qwen-Image model with the Fun branch wired from the facts: -> (hints, velocity)."""
    from tools.comfy_paths import import_comfy_for_oracle  # noqa: PLC0415

    import_comfy_for_oracle()
    import comfy.ops  # noqa: PLC0415
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel, QwenImageTransformerBlock  # noqa: PLC0415

    ops, hidden = comfy.ops.disable_weight_init, CFG.hidden
    base = QwenImageTransformer2DModel(
        num_layers=CFG.num_layers, attention_head_dim=CFG.head_dim, num_attention_heads=CFG.num_heads,
        joint_attention_dim=CFG.text_dim, axes_dims_rope=CFG.rope_axes, operations=ops,
    )  # fmt: skip
    base.load_state_dict(sd_dit, strict=True)
    branch = torch.nn.Module()
    branch.img_in = torch.nn.Linear(33 * 4, hidden)
    branch.blocks = torch.nn.ModuleList(
        QwenImageTransformerBlock(hidden, CFG.num_heads, CFG.head_dim, operations=ops) for _ in range(FUN.num_blocks)
    )
    for blk in branch.blocks:
        blk.before_proj, blk.after_proj = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, hidden)
    sd = {k.replace("control_blocks.", "blocks.").replace("control_img_in", "img_in"): v for k, v in sd_fun.items()}
    missing, unexpected = branch.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == ["blocks.1.before_proj.weight", "blocks.1.before_proj.bias"], missing
    blocks = branch.blocks
    x5, c5 = img[:, :, None], context[:, :, None]
    with torch.no_grad():
        tokens, ids, _ = base.process_img(x5)
        ctx_tokens, _, _ = base.process_img(c5)
        n_h, n_w = (img.shape[-2] + 1) // 2, (img.shape[-1] + 1) // 2
        start = max(n_w // 2, n_h // 2)  # ComfyUI's text start (its RoPE convention)
        txt_ids = torch.arange(start, start + txt.shape[1]).reshape(1, -1, 1).repeat(img.shape[0], 1, 3)
        pe = base.pe_embedder(torch.cat([txt_ids, ids], dim=1)).contiguous()
        h = base.img_in(tokens)
        t = base.txt_in(base.txt_norm(txt))
        temb = base.time_text_embed(sigma, h)
        c = branch.img_in(ctx_tokens)
        hints = {}
        for k, blk in enumerate(blocks):
            if k == 0:
                c = blk.before_proj(c) + h
            t, c = blk(hidden_states=c, encoder_hidden_states=t, encoder_hidden_states_mask=None, temb=temb,
                       image_rotary_emb=pe)  # fmt: skip
            hints[FUN.injection_layers[k]] = blk.after_proj(c)
        control = {"input": [hints[i] * strength if i in hints else None for i in range(CFG.num_layers)]}
        v = base(x5, sigma, txt, control=control)[:, :, 0]
    return hints, v


def test_hints_and_velocity_match_the_comfyui_oracle(tmp_path, dtype=torch.bfloat16):  # bf16 file, fp32 compute
    path = C.write_fun(tmp_path / "fun.safetensors", FUN, seed=3, dtype=dtype)
    net, model = load_fun_controlnet(path), dit()
    assert net.config == FUN and net.kind == "fun"
    assert len(net.state_dict()) == 2 + 2 * 34 + 2  # control_img_in, 2 x (block + after_proj), before_proj
    img, sigma, txt, ctx = inputs(b=2)
    sd_fun = {k: v.to(dtype).float() for k, v in C.fun_state_dict(FUN, 3).items()}
    ref_hints, ref_v = comfy_oracle(D.state_dict(CFG, 2), sd_fun, img, sigma, txt, ctx, strength=0.8)
    with torch.no_grad():
        hints = net(model, img, sigma, txt, ctx, positions="comfyui")
        v = model(img, sigma, txt, positions="comfyui", block_hook=hint_hook({i: h * 0.8 for i, h in hints.items()}))
    assert sorted(hints) == [0, 2]
    for i in hints:
        assert (hints[i] - ref_hints[i]).abs().max() <= 1e-5 * max(1.0, ref_hints[i].abs().max())
    assert (v - ref_v).abs().max() <= 1e-4, float((v - ref_v).abs().max())
    with torch.no_grad():
        assert (v - model(img, sigma, txt, positions="comfyui")).abs().max() > 1e-3  # the hints act


def test_zero_after_proj_gives_the_plain_dit_exactly(tmp_path):
    net = load_fun_controlnet(C.write_fun(tmp_path / "fun0.safetensors", FUN, seed=4, zero_after=True))
    model = dit()
    img, sigma, txt, ctx = inputs()
    with torch.no_grad():
        hints = net(model.to(torch.float32), img, sigma, txt, ctx)
        assert all(h.abs().max() == 0 for h in hints.values())
        assert torch.equal(model(img, sigma, txt, block_hook=hint_hook(hints)), model(img, sigma, txt))


def test_sampling_forward_strength_and_fractions(tmp_path):
    net = load_fun_controlnet(C.write_fun(tmp_path / "fun.safetensors", FUN, seed=5, dtype=torch.float32))
    model = dit()
    img, sigma, txt, ctx = inputs(b=1)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.0])
    with torch.no_grad():
        plain = model(img, torch.tensor([0.7]), txt)
        hints = net(model, img, torch.tensor([0.7]), txt, ctx)
        want = model(img, torch.tensor([0.7]), txt, block_hook=hint_hook({i: 0.5 * h for i, h in hints.items()}))
        # step 1 of 3 with start 0.3: active; two nets of strength 0.25 sum to one of 0.5
        two = FunForward(model, [FunControl(net, ctx, 0.25, 0.3, 1.0), FunControl(net, ctx, 0.25)], sigmas)
        assert (two(img, torch.tensor([0.7]), txt) - want).abs().max() <= 1e-5
        late = FunForward(model, [FunControl(net, ctx, 0.5, start=0.5)], sigmas)  # 1/3 < 0.5: not yet
        assert torch.equal(late(img, torch.tensor([0.7]), txt), plain)
        # CFG batch: the context serves the negative rows; each row has its own prompt
        img2, txt2 = torch.cat([img, img]), torch.cat([txt, txt.flip(1)])
        out = FunForward(model, [FunControl(net, ctx, 0.5)], sigmas)(img2, torch.tensor([0.7, 0.7]), txt2)
        assert (out[:1] - want).abs().max() <= 1e-5


def test_context_latent_layout():
    g = torch.Generator().manual_seed(0)
    control, inpaint = torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 4, 6, generator=g)
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., :16, :] = 1.0  # repaint the top half (pixel size: resized nearest to the latent's)
    ctx = context_latent(control, mask, inpaint)
    assert ctx.shape == (1, 33, 4, 6)
    assert torch.equal(ctx[:, :16], control) and torch.equal(ctx[:, 17:], inpaint)
    assert ctx[0, 16, :2].eq(0).all() and ctx[0, 16, 2:].eq(1).all()  # 1 - mask
    only = context_latent(control)
    assert only[:, 16:].eq(0).all()  # no mask, no inpaint image: zeros (VideoX-Fun's pipeline, ComfyUI)


def test_fp8_file_keeps_float8(tmp_path):
    p8 = C.write_fun(tmp_path / "fun8.safetensors", FUN, seed=3, dtype=torch.bfloat16, linear_dtype=torch.float8_e4m3fn)
    net8 = load_fun_controlnet(p8)
    assert net8.control_img_in.weight.dtype == torch.float8_e4m3fn and "float8" in net8.storage
    net = load_fun_controlnet(C.write_fun(tmp_path / "fun.safetensors", FUN, seed=3, dtype=torch.float32))
    model = dit()
    img, sigma, txt, ctx = inputs()
    with torch.no_grad():
        a, b = net8(model, img, sigma, txt, ctx), net(model, img, sigma, txt, ctx)
    for i in a:
        assert (a[i] - b[i]).norm() <= 0.1 * b[i].norm()  # float8 rounding of the weights only


def test_published_layout_sizes_and_detection(tmp_path):
    full = fun_format.sizes_from_shapes(C.fun_shapes(C.fun_config(D.config(), 5, fun_format.INJECTION_LAYERS)), "f")
    assert full == dict(num_blocks=5, num_heads=24, head_dim=128, mlp_dim=12288)
    assert len(C.fun_shapes(C.fun_config(D.config(), 5, fun_format.INJECTION_LAYERS))) == 174
    fun = C.write_fun(tmp_path / "fun.safetensors", FUN, seed=1)
    instantx = C.write_instantx(tmp_path / "ix.safetensors", D.tiny_config(num_layers=1), seed=1)
    assert fun_format.is_fun_file(fun) and not fun_format.is_fun_file(instantx)


def test_refusals_name_the_file(tmp_path):
    instantx = C.write_instantx(tmp_path / "ix.safetensors", D.tiny_config(num_layers=1), seed=1)
    with pytest.raises(CheckpointError, match="InstantX Qwen-Image ControlNet, not a Fun one"):
        load_fun_controlnet(instantx)
    flux = write_safetensors(tmp_path / "flux.safetensors", [
        ("controlnet_single_blocks.0.weight", (4, 4), torch.float32, lambda: torch.zeros(4, 4)),
        ("x_embedder.weight", (4, 4), torch.float32, lambda: torch.zeros(4, 4))])  # fmt: skip
    with pytest.raises(CheckpointError, match="Flux ControlNet"):
        load_fun_controlnet(flux)
    sdxl = write_safetensors(tmp_path / "sdxl.safetensors", [
        ("input_hint_block.0.weight", (4, 4), torch.float32, lambda: torch.zeros(4, 4)),
        ("zero_convs.0.0.weight", (4, 4), torch.float32, lambda: torch.zeros(4, 4))])  # fmt: skip
    with pytest.raises(CheckpointError, match="SDXL ControlNet"):
        load_fun_controlnet(sdxl)
    with pytest.raises(CheckpointError, match="diffusion model"):
        load_fun_controlnet(D.write_comfy(tmp_path / "dit.safetensors", D.tiny_config(num_layers=1)))
    from qwen_image_core.controlnet import load_controlnet  # noqa: PLC0415

    with pytest.raises(CheckpointError, match="Fun Qwen-Image ControlNet Union"):
        load_controlnet(C.write_fun(tmp_path / "fun.safetensors", FUN, seed=1))


def test_wrong_dit_and_context_are_clear_errors(tmp_path):
    net = load_fun_controlnet(C.write_fun(tmp_path / "fun.safetensors", FUN, seed=1))
    img, sigma, txt, ctx = inputs()
    with pytest.raises(ValueError, match="has 2 blocks"):
        net(MMDiT(D.tiny_config(num_layers=2)), img, sigma, txt, ctx)
    with pytest.raises(ValueError, match="wide"):
        net(MMDiT(D.tiny_config(num_layers=3, num_heads=2, mlp_dim=256)), img, sigma, txt, ctx)
    with pytest.raises(ValueError, match="33 channels"):
        net(dit(), img, sigma, txt, ctx[:, :17])


def test_comfy_face_takes_the_qwenpix_model_and_names_another(tmp_path):
    """The CONTROL_NET our loader gives (in-process): copies keep the class, the hints come back per DiT block
    (None between), another MODEL's diffusion model is a clear error."""
    import importlib  # noqa: PLC0415

    from tools.comfy_paths import import_comfy_for_oracle, import_pack  # noqa: PLC0415

    import_comfy_for_oracle()
    import_pack()
    face = importlib.import_module("qwenpix.nodes.controlnet_fun")
    native = importlib.import_module("qwenpix.nodes.native_model")
    net = load_fun_controlnet(C.write_fun(tmp_path / "fun.safetensors", FUN, seed=2, dtype=torch.float32))
    handle = face.control_net(net, torch.float32, "comfyui")
    assert type(handle.copy()) is face.FunControlNetHandle and handle.copy().control_model is handle.control_model
    model = dit()
    img, sigma, txt, ctx = inputs()
    with torch.no_grad():
        out = handle.control_model(img[:, :, None], sigma, txt, hint=ctx[:, :16, None],
                                   base_model=native.NativeDiT(model, torch.float32, "comfyui"))["input"]  # fmt: skip
        want = net(model, img, sigma, txt, ctx[:, :16], positions="comfyui")
        padded = torch.cat([txt, torch.zeros(1, 2, txt.shape[-1])], dim=1)  # the official positions' padded batch
        base = native.NativeDiT(model, torch.float32, "comfyui")
        lengths = handle.control_model(img[:, :, None], sigma, padded, hint=ctx[:, :16, None], txt_lengths=[7],
                                       base_model=base)["input"]  # fmt: skip
    assert "txt_lengths" in handle.extra_conds and (lengths[0] - out[0]).abs().max() <= 1e-5
    assert len(out) == 3 and out[1] is None  # (ComfyUI's attention dispatch: the same up to rounding)
    assert all((out[i] - want[i]).abs().max() <= 1e-5 * max(1.0, want[i].abs().max()) for i in (0, 2))
    with pytest.raises(ValueError, match="QwenPix diffusion model loader"):
        handle.control_model(img[:, :, None], sigma, txt, hint=ctx[:, :16, None], base_model=torch.nn.Linear(2, 2))
