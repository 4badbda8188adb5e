"""Reference implementations built for the parity tests (diffusers, transformers), shared by test files.

Edit pipelines of diffusers 0.42.1 do not pass `mm_token_type_ids`, without which transformers 5.x gives
image tokens 1D positions; `VLOracle` passes it (image tokens = 1), so the oracle uses the 3D M-RoPE
positions transformers 4.x and ComfyUI compute. `Processor` is transformers' Qwen2VLProcessor minus its
video-processor type check (torchvision is not installed).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen_image_core.mmdit import patchify, unpatchify
from qwen_image_core.prompts import IMAGE_PAD, VISION_END, VISION_START, rope_index
from tools.comfy_paths import comfyui_dir

TOKENIZER = comfyui_dir() / "comfy" / "text_encoders" / "qwen25_tokenizer"  # the real Qwen2.5 tokenizer
# scheduler/scheduler_config.json of the Qwen/Qwen-Image repos
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    time_shift_type="exponential",
    shift_terminal=0.02,
)


class VLOracle(Qwen2_5_VLForConditionalGeneration):
    """Passes `mm_token_type_ids` (which diffusers 0.42.1 omits) so transformers 5.x builds 3D positions."""

    def forward(self, input_ids=None, mm_token_type_ids=None, **kwargs):
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = (input_ids == IMAGE_PAD).int()
        return super().forward(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, **kwargs)


class Processor(Qwen2VLProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def tokenizer():
    return Qwen2Tokenizer.from_pretrained(str(TOKENIZER))


def processor(tok):
    return Processor(image_processor=Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056), tokenizer=tok)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)


def diffusers_dit(cfg, state_dict, zero_cond_t=False):
    """diffusers' QwenImageTransformer2DModel with the given (diffusers-named) weights, float32, eval."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim,
        axes_dims_rope=cfg.rope_axes,
        zero_cond_t=zero_cond_t,
    )
    m.load_state_dict(state_dict, strict=True)
    return m.eval()


def diffusers_fused(cfg, lora_path, strength):
    """diffusers' own LoRA loader (format conversion + PEFT) on tools' base weights, fused at `strength`:
    {module name: fused weight} for every layer a LoRA can target."""
    from diffusers import QwenImagePipeline

    from tools.checkpoints import dit as W
    from tools.checkpoints.lora import lora_modules

    pipe = QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=diffusers_dit(cfg, W.state_dict(cfg))
    )
    pipe.load_lora_weights(str(lora_path), adapter_name="x")
    pipe.fuse_lora(lora_scale=strength, components=["transformer"])
    mods = dict(pipe.transformer.named_modules())
    return {name: getattr(mods[name], "base_layer", mods[name]).weight.detach() for name, _ in lora_modules(cfg)}


# -- DiT oracle helpers
TOL = 1e-5  # max |ours - reference| relative to max |reference|


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x output scale {scale:.3g}"


def diffusers_velocity(m, img, sigma, txt, mask=None, refs=()):
    """Run diffusers' model on packed tokens the way its pipelines do; unpack the target's velocity."""
    tokens, shapes = [], []
    for x in (img, *refs):
        t, (h, w) = patchify(x.expand(img.shape[0], *x.shape[1:]), 2)
        tokens.append(t)
        shapes.append((1, h, w))
    with torch.no_grad():
        out = m(
            hidden_states=torch.cat(tokens, 1),
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=[shapes] * img.shape[0],
            return_dict=False,
        )[0]
    n = shapes[0][1] * shapes[0][2]
    return unpatchify(out[:, :n], shapes[0][1:], 2, img.shape[-2:])


def inputs(b=1, h=8, w=12, L=7, seed=0, text_dim=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, L, text_dim, generator=g)


# -- Qwen2.5-VL parity helpers: transformers' last hidden state vs ours, image-token rows, images
def oracle_hidden(model, ids, mask=None, pixel_values=None, grids=None):
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            image_grid_thw=grids,
            mm_token_type_ids=(ids == IMAGE_PAD).int(),
            output_hidden_states=True,
        )
    return out.hidden_states[-1]


def ours_hidden(model, ids, pixel_values=None, grids=None):
    grid_list = [] if grids is None else [tuple(g) for g in grids.tolist()]
    feats = model.encode_images(pixel_values, grid_list) if pixel_values is not None else None
    with torch.no_grad():
        return model(
            ids, rope_index(ids, grid_list), torch.float32, feats, ids == IMAGE_PAD if feats is not None else None
        )


def image_row(prefix_len: int, counts: list[int], tail: int, gen: torch.Generator) -> list[int]:
    """Random text, then per image <|vision_start|> + pads + <|vision_end|> + a little text."""
    row = torch.randint(0, 151000, (prefix_len,), generator=gen).tolist()
    for n in counts:
        row += [VISION_START] + [IMAGE_PAD] * n + [VISION_END] + torch.randint(0, 151000, (3,), generator=gen).tolist()
    return row + torch.randint(0, 151000, (tail,), generator=gen).tolist()


def pixels(images):
    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    out = proc(images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def noise_image(h, w, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


# -- Qwen-Image-2.1 DiT oracle (diffusers' QwenImage21Transformer2DModel)
def diffusers_dit21(cfg, state_dict):
    """diffusers' 2.1 DiT (float32, eval, its default SDPA processor) with the given ComfyUI-named weights."""
    from diffusers import QwenImage21Transformer2DModel

    from tools.checkpoints.dit21 import diffusers_state_dict

    torch.manual_seed(0)
    m = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        context_in_dim=cfg.text_dim,
        mlp_ratio=cfg.mlp_dim // cfg.hidden,
        axes_dims_rope=cfg.rope_axes,
        eps=cfg.eps,
        causal_condition=cfg.causal_condition,
    )
    m.load_state_dict(diffusers_state_dict(state_dict), strict=True)
    return m.eval()


def diffusers_velocity21(m, img, sigma, txt, image_slots=None, refs=(), mask=None, kv_cache=None, kv_mode=None):
    """Run diffusers' 2.1 model as its pipeline does (references first, target last, one image slot per 2x2
    target tokens appended to the slot mask); the target's velocity [B, C, H, W]."""
    b, c, h, w = img.shape
    seq = [r.expand(b, *r.shape[1:]) for r in refs] + [img]
    tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in seq], dim=1)
    shapes = [(1, x.shape[-2], x.shape[-1]) for x in seq]
    slots = torch.zeros(txt.shape[1], dtype=torch.bool) if image_slots is None else image_slots
    img_mask = torch.cat([slots, torch.ones(h * w // 4, dtype=torch.bool)])[None].expand(b, -1)
    with torch.no_grad():
        out = m(
            hidden_states=tokens,
            encoder_hidden_states=txt,
            timestep=sigma,
            img_shapes=[shapes] * b,
            img_mask=img_mask,
            encoder_hidden_states_mask=mask,
            kv_cache=kv_cache,
            kv_cache_mode=kv_mode,
            return_dict=False,
        )[0]
    return out[:, -h * w :].transpose(1, 2).reshape(b, c, h, w)


# -- Qwen3-VL (Qwen-Image-2.1's encoder) parity helpers: features, processor, the chat template of the system turn
# the Qwen chat format of the system message diffusers tokenizes to count the dropped tokens
QWEN21_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


def qwen3_features(model, **inputs):
    """transformers' Qwen3-VL last decoder layer output, before the final norm (as diffusers takes it: the norm
    hooked out)."""
    hook = model.model.language_model.norm.register_forward_hook(lambda m, args, out: args[0])
    try:
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        hook.remove()


def qwen3_image_processor():
    """transformers' Qwen2VL image processor with the Qwen3-VL settings of `qwen21.prompts`."""
    from qwen_image_core.qwen21 import prompts as P

    return Qwen2VLImageProcessorPil(
        patch_size=P.PATCH, merge_size=P.MERGE, temporal_patch_size=P.TEMPORAL, image_mean=list(P.VL_MEAN),
        image_std=list(P.VL_STD), min_pixels=P.VL_MIN_PIXELS, max_pixels=P.VL_MAX_PIXELS,
    )  # fmt: skip


def qwen3_processor(tok):
    """transformers' Qwen3VLProcessor without its video processor (torchvision is not installed)."""
    from transformers import Qwen3VLProcessor

    class Qwen3Processor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen3Processor(image_processor=qwen3_image_processor(), tokenizer=tok, chat_template=QWEN21_CHAT_TEMPLATE)


def rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Assert max |ours - ref| <= tol x max |ref|; returns the relative error."""
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x scale {scale:.3g}"
    return err / scale
