"""Qwen-Image-2.1 loader nodes: the DiT, the Qwen3-VL-8B condition encoder and the RGBA VAE, each from ComfyUI's
model folders, as the 2.1 family's own types (QWENPIX21_*), so a 2.1 output cannot be linked to a v1 node. The
types, the handle of the DiT and the check that names a v1 component handed to a 2.1 node live here too
(`nodes/qwen21.py` holds the encode, sampler and decode nodes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..qwen_image_core.formats.vae21 import load_vae21
from ..qwen_image_core.qwen21 import DiT21, load_dit21, load_qwen3_vl
from . import host, placement
from .loaders import compute_dtype_input, load_file, weights_line
from .qwen21_model import dit21_model

CATEGORY = "QwenPix/Qwen-Image-2.1"
DIT21, ENCODER21, VAE21, COND21 = "QWENPIX21_DIT", "QWENPIX21_TEXT_ENCODER", "QWENPIX21_VAE", "QWENPIX21_CONDITIONING"
V1_DIT, V1_ENCODER, V1_VAE = "MODEL", "QWENPIX_TEXT_ENCODER", "QWENPIX_VAE"  # accepted only to be named clearly
NO_NATIVE = (
    "ComfyUI 0.3.75 has no Qwen-Image-2.1 model class: the loader's MODEL output is the pack's own ComfyUI model "
    "of it (KSampler, SamplerCustomAdvanced, LoraLoaderModelOnly; not v1 patches or ControlNets)."
)
DIT_NODE, ENCODER_NODE, VAE_NODE = (
    "'Load Qwen-Image-2.1 Diffusion Model'",
    "'Load Qwen-Image-2.1 Text Encoder'",
    "'Load Qwen-Image-2.1 VAE'",
)


@dataclass
class DiT21Handle:
    """The loaded 2.1 DiT and the dtype its math runs in."""

    dit: DiT21
    dtype: torch.dtype


def _refuse_v1(name: str, value, want: type, node: str, v1_home: str):
    """`value` if it is the 2.1 component `want`; else an error saying what it is and which node loads the 2.1 one."""
    if isinstance(value, want):
        return value
    v1 = {
        "ModelPatcher": "native MODEL (a Qwen-Image v1 DiT or another model)",
        "TextEncoderHandle": "Qwen-Image v1 text encoder (Qwen2.5-VL)",
        "ImageVAE": "Qwen-Image v1 VAE (16 channels)",
    }
    kind = type(value).__mro__
    what = next((v1[k.__name__] for k in kind if k.__name__ in v1), type(value).__name__)  # fmt: skip
    raise host.InputError(
        f"{name}: a {what}, not a Qwen-Image-2.1 component; the 2.1 nodes need the file loaded with {node}\n"
        f"Fix: load a Qwen-Image-2.1 file with {node} (a Qwen-Image v1 model goes to {v1_home})"
    )


class QwenPix21DiTLoader:
    DISPLAY_NAME = "Load Qwen-Image-2.1 Diffusion Model"
    CATEGORY = CATEGORY
    RETURN_TYPES = (DIT21, "MODEL")
    RETURN_NAMES = ("dit", "model")
    OUTPUT_TOOLTIPS = (
        "The Qwen-Image-2.1 DiT for the Qwen-Image-2.1 Sampler.",
        "The same DiT as a ComfyUI MODEL for KSampler / SamplerCustomAdvanced, with the 2.1 Encode's positive and "
        "negative (shift for 1024x1024: set it for your latent with Qwen-Image-2.1 Model Sampling).",
    )
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a Qwen-Image-2.1 diffusion model (qwen_image_2.1_bf16, _int8_convrot, the Turbo files, GGUF, a "
        "diffusers transformer/ folder); weights stay in their stored form. Outputs the DiT for the 2.1 Sampler and "
        "a MODEL for ComfyUI's samplers (flow matching with the 2.1 dynamic shift, the prefix K/V cache once per "
        "run, LoRAs in ComfyUI's diffusion_model. key layout). " + NO_NATIVE
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (
                    host.model_names("diffusion_models", "transformer"),
                    {"tooltip": "A Qwen-Image-2.1 file from models/diffusion_models (e.g. qwen_image_2.1_bf16)."},
                ),
                "compute_dtype": compute_dtype_input(),
            }
        }

    @classmethod
    def IS_CHANGED(cls, dit_name: str, **other_inputs):
        return host.model_fingerprint("diffusion_models", dit_name, "transformer")

    def load(self, dit_name: str, compute_dtype: str):
        fix = "choose a Qwen-Image-2.1 DiT from models/diffusion_models (a v1 Qwen-Image DiT: 'Load Qwen-Image "
        fix += "Diffusion Model')"
        dit = load_file("dit_name", dit_name, "diffusion_models", "transformer", "DiT 2.1", fix, load_dit21)
        dtype = host.compute_dtype(compute_dtype, host.compute_device())
        model = dit21_model(dit, dtype)
        return {"ui": {"qwenpix_plan": [weights_line(dit)]}, "result": (DiT21Handle(dit, dtype), model)}


class QwenPix21TextEncoderLoader:
    DISPLAY_NAME = "Load Qwen-Image-2.1 Text Encoder"
    CATEGORY = CATEGORY
    RETURN_TYPES = (ENCODER21,)
    OUTPUT_TOOLTIPS = ("Qwen3-VL-8B with its tokenizer, for Qwen-Image-2.1 Encode.",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads the Qwen3-VL-8B condition encoder of Qwen-Image-2.1 (bf16, int8_convrot, w4a8, diffusers, or llama.cpp "
        "GGUF with its mmproj vision file next to it)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (
                    host.model_names("text_encoders", "text_encoder"),
                    {
                        "tooltip": "A Qwen3-VL file from models/text_encoders (e.g. qwen_3_vl_8b_bf16, or "
                        "Qwen3-VL-8B-Instruct-Q8_0.gguf with its mmproj-F16.gguf beside it for pictures)."
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, text_encoder_name: str, **other_inputs):
        return host.model_fingerprint("text_encoders", text_encoder_name, "text_encoder")

    def load(self, text_encoder_name: str):
        fix = "choose the Qwen3-VL encoder of Qwen-Image-2.1 from models/text_encoders (v1's Qwen2.5-VL: 'Load "
        fix += "Qwen-Image Text Encoder')"

        def loader(path):
            beside = (path if path.is_dir() else path.parent) / "tokenizer"
            return load_qwen3_vl(path, tokenizer=beside if beside.is_dir() else host.comfy_tokenizer_dir())

        name = text_encoder_name
        enc = load_file("text_encoder_name", name, "text_encoders", "text_encoder", "Qwen3-VL", fix, loader)
        placement.text_encoder_patcher(enc.model)  # registered with ComfyUI's model management, as v1's encoder
        return {"ui": {"qwenpix_plan": [weights_line(enc.model)]}, "result": (enc,)}


class QwenPix21VAELoader:
    DISPLAY_NAME = "Load Qwen-Image-2.1 VAE"
    CATEGORY = CATEGORY
    RETURN_TYPES = (VAE21,)
    OUTPUT_TOOLTIPS = ("The 64-channel, 16x RGBA VAE of Qwen-Image-2.1.",)
    FUNCTION = "load"
    DESCRIPTION = "Loads the Qwen-Image-2.1 VAE (64 latent channels, 16x, RGBA) from a single file or diffusers folder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (host.model_names("vae", "vae"), {"tooltip": "A file from models/vae."})}}

    @classmethod
    def IS_CHANGED(cls, vae_name: str, **other_inputs):
        return host.model_fingerprint("vae", vae_name, "vae")

    def load(self, vae_name: str):
        fix = "choose the Qwen-Image-2.1 VAE from models/vae (v1's qwen_image_vae: 'Load Qwen-Image VAE')"
        return (load_file("vae_name", vae_name, "vae", "vae", "VAE 2.1", fix, load_vae21),)


LOADERS = {
    "QwenPix21DiTLoader": QwenPix21DiTLoader,
    "QwenPix21TextEncoderLoader": QwenPix21TextEncoderLoader,
    "QwenPix21VAELoader": QwenPix21VAELoader,
}
