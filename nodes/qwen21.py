"""Qwen-Image-2.1 nodes: loaders for its three files, the encode node (prompt + up to 10 references), the sampler
(dynamic shift or the Turbo sigmas, true CFG, the prefix K/V cache filled once per run) and the RGBA decode.

The 2.1 family is a second architecture (a 7B single-stream DiT, Qwen3-VL-8B, a 64-channel 16x RGBA VAE), so its
files load with their own loaders and travel as their own types (QWENPIX21_*): a 2.1 output cannot be linked to a
v1 node, the v1 loaders name these loaders when handed a 2.1 file, and these nodes name the v1 nodes when
handed a v1 model. ComfyUI 0.3.75 has no Qwen-Image-2.1 model class: the 2.1 sampler runs the core's Euler loop
(`qwen_image_core.qwen21.pipeline`); the loader's MODEL output and Encode's positive / negative are the pack's
own ComfyUI model of the DiT for ComfyUI's samplers (`qwen21_model.py`, `qwen21_sampling.py`).
Every number comes from the core pipeline's pieces, in the same order as `QwenImage21Pipeline.generate/edit`,
so a graph's image equals the core's for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.utils
import torch

from ..qwen_image_core.qwen21 import ImageVAE21, Qwen3VLEncoder
from ..qwen_image_core.qwen21.layout import MAX_REFERENCES
from ..qwen_image_core.qwen21.pipeline import (
    RESIZES,
    SIZE_MULTIPLE,
    QwenImage21Pipeline,
    make_sigmas,
    prepare_references,
)
from ..qwen_image_core.qwen21.prompts import rgba_prompt, vision_patches21
from ..qwen_image_core.qwen21.sampler import Condition21
from ..qwen_image_core.qwen21.schedule import VAE_SCALE
from . import checks, host, inputs, notices, placement, qwen21_model
from .qwen21_loaders import (
    COND21,
    DIT21,
    DIT_NODE,
    ENCODER21,
    ENCODER_NODE,
    LOADERS,
    NO_NATIVE,
    V1_DIT,
    V1_ENCODER,
    V1_VAE,
    VAE21,
    VAE_NODE,
    DiT21Handle,
    _refuse_v1,
)
from .qwen21_lora import NODES as LORA_NODES
from .qwen21_sampling import NODES as SAMPLING_NODES

CATEGORY = "QwenPix/Qwen-Image-2.1"
SCHEDULES = ("dynamic", "turbo")  # the base checkpoint's shift from the token count; the Turbo file's 8 sigmas


@dataclass
class Conditioning21:
    """What the encode node hands the sampler: the positive and negative conditions (reference latents set) and,
    for an edit with resize "pad", the (width, height) to crop the decoded picture back to."""

    positive: Condition21
    negative: Condition21
    crop: tuple[int, int] | None
    negative_prompt: str = ""  # the text, to say when cfg 1 leaves it unused


def _image_inputs() -> dict:
    tip = "Reference {i} (optional), addressed in the prompt as <image{i}>; RGBA keeps its alpha."
    return {f"image{i}": ("IMAGE", {"tooltip": tip.format(i=i)}) for i in range(1, MAX_REFERENCES + 1)}


def _references(images: dict) -> list[torch.Tensor]:
    refs = []
    for i in range(1, MAX_REFERENCES + 1):
        image = images.pop(f"image{i}", None)
        if image is None:
            continue
        checks.check_image(f"image{i}", image)
        if image.shape[0] != 1 or image.shape[-1] not in (3, 4):
            raise host.InputError(
                f"image{i}: {list(image.shape)}; one RGB or RGBA picture per input\nFix: connect one colour image"
            )
        refs.append(image[0].float().cpu())
    if images:
        names = ", ".join(sorted(images))
        raise host.InputError(
            f"{names}: Qwen-Image-2.1 edits with at most {MAX_REFERENCES} references (image1 .. image"
            f"{MAX_REFERENCES})\nFix: disconnect {names}"
        )
    return refs


class QwenPix21Encode:
    DISPLAY_NAME = "Qwen-Image-2.1 Encode"
    CATEGORY = CATEGORY
    RETURN_TYPES = (COND21, "LATENT", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("conditioning", "latent", "positive", "negative")
    OUTPUT_TOOLTIPS = (
        "The prompt and negative (with the references) for the Qwen-Image-2.1 Sampler.",
        "An empty 2.1 latent: image1's size for edits (padded to 32), else width x height.",
        "The prompt (with the references) as CONDITIONING for KSampler / CFGGuider on the 2.1 MODEL.",
        "The negative prompt (with the references) as CONDITIONING for the 2.1 MODEL.",
    )
    FUNCTION = "encode"
    DESCRIPTION = (
        "Encodes a prompt (a STRING from any node) with Qwen3-VL and up to 10 reference pictures (image1 .. image10, "
        "<image1> .. in the prompt); references are encoded by the 2.1 VAE too. Outputs the conditioning for the "
        "2.1 Sampler, an empty latent sized to image1 (edits) or width x height (text-to-image), and positive / "
        "negative CONDITIONING for ComfyUI's samplers on the 2.1 loader's MODEL."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (f"{ENCODER21},{V1_ENCODER}", {"tooltip": "From Load Qwen-Image-2.1 Text Encoder."}),
                "vae": (f"{VAE21},{V1_VAE}", {"tooltip": "From Load Qwen-Image-2.1 VAE (encodes the references)."}),
                "prompt": ("STRING", {"multiline": True, "tooltip": "The prompt; refer to references as <image1>."}),
                "negative_prompt": ("STRING", {"default": "", "tooltip": "Used by the sampler when cfg > 1."}),
                "width": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 32,
                        "max": 4096,
                        "step": 32,
                        "tooltip": "Text-to-image width (edits take image1's size).",
                    },
                ),  # fmt: skip
                "height": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 32,
                        "max": 4096,
                        "step": 32,
                        "tooltip": "Text-to-image height (edits take image1's size).",
                    },
                ),  # fmt: skip
                "resize": (
                    list(RESIZES),
                    {
                        "default": "pad",
                        "tooltip": "pad: references padded to multiples of 32, "
                        "never resampled, the output cropped back (pixels stay aligned). official: the "
                        "reference's resize to about resolution² pixels.",
                    },
                ),  # fmt: skip
                "resolution": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 256,
                        "max": 4096,
                        "step": 32,
                        "tooltip": "Only with resize 'official': the target side.",
                    },
                ),  # fmt: skip
                "rgba": ("BOOLEAN", {"default": False, "tooltip": "Ask for a transparent background (RGBA prompt)."}),
            },
            "optional": _image_inputs(),
        }

    def encode(self, text_encoder, vae, prompt, negative_prompt, width, height, resize, resolution, rgba, **images):
        encoder = _refuse_v1("text_encoder", text_encoder, Qwen3VLEncoder, ENCODER_NODE, "Qwen-Image Text Encode")
        vae = _refuse_v1("vae", vae, ImageVAE21, VAE_NODE, "the v1 VAE nodes")
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise host.InputError("prompt / negative_prompt: expected STRING values\nFix: connect a STRING output")
        refs = _references(images)
        if resize not in RESIZES:
            raise host.InputError(f"resize: {resize!r} is not one of {', '.join(RESIZES)}\nFix: choose 'pad'")
        prompt = rgba_prompt(prompt) if rgba else prompt
        crop = None
        pictures, latents = (), None
        if refs:
            try:
                prepared = prepare_references(refs, resize, int(resolution))
            except ValueError as e:
                raise host.InputError(f"{e}\nFix: connect larger references or set resize to 'official'") from None
            pictures, crop = prepared.images, prepared.crop
            width, height = pictures[0].size
            with placement.vae_on_device(vae) as device:
                latents = QwenImage21Pipeline.encode_images(_Parts(device, vae=vae), pictures)
        width, height = int(width) // SIZE_MULTIPLE * SIZE_MULTIPLE, int(height) // SIZE_MULTIPLE * SIZE_MULTIPLE
        if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
            raise host.InputError(f"width/height: at least {SIZE_MULTIPLE} pixels a side\nFix: set a larger size")
        device = load_encoder(encoder, (prompt, negative_prompt), pictures)
        conds = _conditions(encoder, (prompt, negative_prompt), pictures, device)
        for c in conds:
            c.ref_latents = latents
        channels = vae.cfg.z_dim
        empty = torch.zeros(1, channels, height // VAE_SCALE, width // VAE_SCALE)
        latent = {"samples": empty.to(host.intermediate_device()), "qwenpix21_crop": crop}
        native = tuple(qwen21_model.conditioning(c) for c in conds)
        return (Conditioning21(conds[0], conds[1], crop, negative_prompt), latent, *native)


class _Parts:
    """The pipeline's pieces each node uses (`encode_images`: the VAE and the device; `noise`, `sample`: the DiT
    and the device), called on what the node holds, so the numbers are the pipeline's own."""

    def __init__(self, device, vae=None, dit=None):
        self.device, self.vae, self.dit = device, vae, dit


def prompt_tokens(encoder: Qwen3VLEncoder, texts, pictures) -> int:
    """The longest row the encoder will run for `texts` with `pictures`: template text + each reference's
    merged vision tokens (the language model's workload; each prompt is encoded on its own row)."""
    if not pictures:
        return max(len(r) for r in encoder.rows(texts, []))
    merge = encoder.model.cfg.vision.merge_size if encoder.has_vision else 1
    counts = [t * h * w // merge**2 for t, h, w in (vision_patches21(p)[1] for p in pictures)]
    return max(len(r) for r in encoder.rows(texts, counts))


def load_encoder(encoder: Qwen3VLEncoder, texts, pictures) -> torch.device:
    """Have ComfyUI's model management load the encoder (registered as v1's: its language model layers resident
    or streamed within ComfyUI's budget, the vision tower with the resident weights) for this prompt's token
    count; returns the device it computes on."""
    tokens = prompt_tokens(encoder, texts, pictures) if encoder.has_vision or not pictures else None
    return placement.load_text_encoder(placement.text_encoder_patcher(encoder.model), len(pictures), tokens)


def _conditions(encoder: Qwen3VLEncoder, texts, pictures, device) -> list[Condition21]:
    """One Condition21 per text. The pictures go through the vision tower once for all texts (each text still runs
    on its own row, so every condition equals its own encode bit for bit), each row cut to its own length."""
    feats, mask, slots = encoder.encode(
        list(texts), pictures, dtype=torch.float32, device=device, check=host.node_progress()
    )
    conds = []
    for i in range(len(texts)):
        n = int(mask[i].sum())
        row_slots = slots[i : i + 1, :n]
        image_slots = row_slots[0] if bool(row_slots.any()) else None  # as QwenImage21Pipeline.encode_prompt
        conds.append(Condition21(feats[i : i + 1, :n].cpu(), image_slots, None, None))
    return conds


def _to(c: Condition21, device, dtype) -> Condition21:
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    refs = None if c.ref_latents is None else [r.to(device) for r in c.ref_latents]
    return Condition21(c.txt.to(device, dtype), mv(c.image_slots), refs, mv(c.txt_mask))


class QwenPix21Sampler:
    DISPLAY_NAME = "Qwen-Image-2.1 Sampler"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised 2.1 latent: decode it with Qwen-Image-2.1 Decode.",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Samples Qwen-Image-2.1 with flow-matching Euler: the dynamic shift from the image's token count (the base "
        "checkpoint) or the Turbo checkpoint's 8 sigmas, true CFG, the prefix K/V cache of text and references "
        "computed once per run. " + NO_NATIVE
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (f"{DIT21},{V1_DIT}", {"tooltip": "From Load Qwen-Image-2.1 Diffusion Model."}),
                "conditioning": (COND21, {"tooltip": "From Qwen-Image-2.1 Encode."}),
                "latent": ("LATENT", {"tooltip": "The empty latent from Qwen-Image-2.1 Encode (sets the size)."}),
                "seed": inputs.seed(),
                "steps": ("INT", {"default": 40, "min": 1, "max": 1000, "tooltip": "Euler steps (turbo: 8)."}),
                "cfg": inputs.true_cfg("True-CFG scale (official 4; turbo 1). 1: no negative pass."),
                "schedule": (
                    list(SCHEDULES),
                    {
                        "default": "dynamic",
                        "tooltip": "dynamic: shift from the token count "
                        "(base checkpoint). turbo: the Turbo checkpoint's published 8 sigmas.",
                    },
                ),  # fmt: skip
            }
        }

    def sample(self, dit, conditioning, latent, seed, steps, cfg, schedule):
        if isinstance(getattr(dit, "model", None), qwen21_model.QwenPix21Model):  # its patches live in the MODEL
            raise host.InputError(
                "dit: the loader's MODEL output (for ComfyUI's samplers); this node takes its 'dit' output\nFix: "
                "connect the 'dit' output here, or sample the MODEL with KSampler / SamplerCustomAdvanced"
            )
        handle = _refuse_v1("dit", dit, DiT21Handle, DIT_NODE, "KSampler or the Qwen-Image Sampler")
        if not isinstance(conditioning, Conditioning21):
            raise host.InputError("conditioning: not from Qwen-Image-2.1 Encode\nFix: connect Qwen-Image-2.1 Encode")
        cfg = checks.finite_number("cfg", cfg, "set cfg from 0 to 100 (4 is the official default)")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        channels = handle.dit.config.in_channels
        if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] != channels:
            raise host.InputError(
                f"latent: {checks.describe_value(samples)} is not a Qwen-Image-2.1 latent [B, {channels}, h, w]\n"
                "Fix: connect the latent output of Qwen-Image-2.1 Encode"
            )
        if samples.shape[0] != 1:
            raise host.InputError(
                f"latent: a batch of {samples.shape[0]}; the Qwen-Image-2.1 Sampler makes one picture per run\n"
                "Fix: connect Qwen-Image-2.1 Encode's latent directly (queue the prompt again for more pictures)"
            )
        height, width = samples.shape[-2] * VAE_SCALE, samples.shape[-1] * VAE_SCALE
        try:
            sig = make_sigmas(schedule, int(steps), height, width)
        except ValueError as e:
            raise host.InputError(f"schedule: {e}\nFix: with 'turbo' set steps to 8") from None
        if cfg == 1.0 and conditioning.negative_prompt.strip():
            notices.warn("negative_prompt: not used with cfg 1 (no guidance pass); set cfg > 1 to use it")
        bar = comfy.utils.ProgressBar(len(sig) - 1)

        def on_step(i, total, x, x0):
            host.check_interrupt()
            bar.update_absolute(i + 1, total)

        device = qwen21_model.load_for_run(handle.dit, handle.dtype, samples.shape, conditioning.positive, cfg != 1.0)
        parts = _Parts(device, dit=handle.dit)
        pos = _to(conditioning.positive, device, handle.dtype)
        neg = _to(conditioning.negative, device, handle.dtype) if cfg != 1.0 else None
        noise = QwenImage21Pipeline.noise(parts, samples.shape[0], height, width, int(seed))
        out = QwenImage21Pipeline.sample(parts, noise, sig, pos, neg, cfg, handle.dtype, on_step)
        bad = checks.describe_non_finite(out)
        if bad:
            raise host.InputError(f"the 2.1 latents hold NaN/inf: {bad}\nFix: compute in bf16 or fp32 (loader)")
        return ({"samples": out.to(handle.dtype).to(host.intermediate_device()), "qwenpix21_crop": conditioning.crop},)


class QwenPix21Decode:
    DISPLAY_NAME = "Qwen-Image-2.1 Decode"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "alpha_mask")
    OUTPUT_TOOLTIPS = (
        "The picture as RGB (edits with resize 'pad': cropped back to image1's size).",
        "Its alpha as a MASK in ComfyUI's convention (1 - alpha; all 0 where the picture is opaque).",
    )
    FUNCTION = "decode"
    DESCRIPTION = "Decodes a Qwen-Image-2.1 latent with the 2.1 RGBA VAE into an IMAGE and its alpha as a MASK."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (f"{VAE21},{V1_VAE}", {"tooltip": "From Load Qwen-Image-2.1 VAE."}),
                "samples": ("LATENT", {"tooltip": "From the Qwen-Image-2.1 Sampler."}),
            }
        }

    def decode(self, vae, samples):
        vae = _refuse_v1("vae", vae, ImageVAE21, VAE_NODE, "Qwen-Image VAE Decode")
        raw = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(raw, torch.Tensor) or raw.dim() != 4 or raw.shape[1] != vae.cfg.z_dim:
            raise host.InputError(
                f"samples: {checks.describe_value(raw)} is not a Qwen-Image-2.1 latent [B, {vae.cfg.z_dim}, h, w]\n"
                "Fix: connect the Qwen-Image-2.1 Sampler"
            )
        with placement.vae_on_device(vae) as device:
            decoded = vae.decode(raw.to(device), check=host.node_progress())
            rgba = (decoded.float() / 2 + 0.5).clamp(0, 1)  # as QwenImage21Pipeline.decode
        crop = samples.get("qwenpix21_crop")
        if crop is not None:
            rgba = rgba[..., : crop[1], : crop[0]]
        out = rgba.movedim(1, -1).to(host.intermediate_device())  # [B, H, W, 4]
        return (out[..., :3].contiguous(), 1.0 - out[..., 3])


NODES = {
    **LOADERS,
    "QwenPix21Encode": QwenPix21Encode,
    "QwenPix21Sampler": QwenPix21Sampler,
    "QwenPix21Decode": QwenPix21Decode,
    **SAMPLING_NODES,
    **LORA_NODES,
}
