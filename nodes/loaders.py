"""Loader nodes: diffusion model (DiT), text encoder, VAE, LoRA. Files come from ComfyUI's model folders."""

from __future__ import annotations

from ..qwen_image_core import matmul as matmul_seam
from ..qwen_image_core.formats.vae import load_vae
from ..qwen_image_core.lora import lora_targets, read_lora
from ..qwen_image_core.mmdit import load_dit
from ..qwen_image_core.text_encoder import load_text_encoder
from . import checks, host, native_model, notices, placement
from .parallel import spread
from .patcher import lora_patches

CATEGORY = "QwenPix/loaders"
DIT, TEXT_ENCODER, VAE = "MODEL", "QWENPIX_TEXT_ENCODER", "QWENPIX_VAE"  # the DiT is a native ComfyUI MODEL
DTYPES = ["auto", "bf16", "fp16", "fp32"]
MATMUL = matmul_seam.MODES  # the DiT loader's matmul choices (off: dequantised weights, float GEMMs)
COMPILE = ("off", "inductor")  # the DiT loader's torch.compile choices (compiled.BACKENDS without the test one)


def weights_line(model) -> str:
    """The loaded file's storage format (e.g. 'int8_convrot (int8 + per-row scales): 840 layers, the rest bf16')
    and the bytes its weights hold in memory, for the loader node."""
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = f"{held / 1e9:.1f} GB" if held >= 1e8 else f"{held / 1e6:.1f} MB"
    return f"{getattr(model, 'storage', '') or 'weights'}; {size}"


def compute_dtype_input() -> tuple:
    """The DiT loaders' `compute_dtype` input (auto: the device's best float type)."""
    tip = "Precision of the math. auto: bf16 on GPUs that have it, else fp16; fp32 on CPU."
    return (DTYPES, {"default": "auto", "tooltip": tip})


def load_file(name: str, value: str, folder: str, repo_part: str, kind: str, fix: str, loader):
    """`loader(path)` of input `name`'s file `value` from ComfyUI's `folder` (`repo_part` of a diffusers repo), held
    in host.MODELS under `kind` (with the files it loads with: a GGUF text encoder's mmproj, so a changed one
    reloads); a missing or unreadable file is an error naming the input, with `fix`."""
    with host.input_problem(name, value, fix):
        path = host.model_path(folder, value, repo_part)
        return host.MODELS.get(kind, path, lambda: loader(path), host.companions(folder, path))


class QwenPixDiTLoader:
    DISPLAY_NAME = "Load Qwen-Image Diffusion Model"
    CATEGORY = CATEGORY
    RETURN_TYPES = (DIT,)
    OUTPUT_TOOLTIPS = (
        "The Qwen-Image diffusion transformer as a native MODEL: KSampler, model patches, LoRA loaders and "
        "caches take it (weights stay in their stored dtype, fp8 included).",
    )
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a Qwen-Image / -2512 / -Edit / -Edit-2509 / -Edit-2511 diffusion model (bf16, fp8, scaled fp8, "
        "GGUF, ComfyUI's quantised files: int8_convrot, nvfp4, mxfp8, w4a8, ...) as a MODEL that every native node "
        "accepts; the node shows the file's format and size."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (
                    host.model_names("diffusion_models", "transformer"),
                    {
                        "tooltip": "A file from models/diffusion_models or models/unet (e.g. "
                        "qwen_image_fp8_e4m3fn.safetensors, Qwen_Image-Q4_K_M.gguf) or a diffusers repo from "
                        "models/diffusers."
                    },
                ),
                "compute_dtype": compute_dtype_input(),
            },
            "optional": {
                "positions": (
                    list(native_model.POSITIONS),
                    {
                        "default": "official (diffusers)",
                        "tooltip": "Token positions (RoPE). official: the reference code's. ComfyUI native: "
                        "ComfyUI's own model's, which differ for odd token grids (1328 px = 83 tokens) and edits; "
                        "choose it to reproduce a seed from a native workflow exactly.",
                    },
                ),
                "matmul": (
                    list(MATMUL),
                    {
                        "default": "off",
                        "tooltip": "off: quantised weights are dequantised and multiplied in the compute dtype (exact "
                        "to the stored weights). fp8: float8_e4m3fn layers (fp8, scaled fp8, comfy_quant fp8) multiply "
                        "natively with the activations quantised per token (torch._scaled_mm: NVIDIA RTX 40xx, H100 "
                        "and newer; other GPUs compute the same math without the speed). int8: int8 comfy_quant files "
                        "(int8_tensorwise, int8_convrot) multiply in int8 (torch._int_mm). Faster on GPUs with those "
                        "units, results change slightly; layers a mode does not cover stay dequantised (the node "
                        "says how many are covered).",
                    },
                ),
                "compile": (
                    list(COMPILE),
                    {
                        "default": "off",
                        "tooltip": "inductor: each transformer block is compiled with torch.compile (fused "
                        "elementwise kernels around the matmuls: RoPE, norms, modulation). The first run of each "
                        "image size takes a while to compile; works with block streaming. Needs a working "
                        "torch.compile (Triton on NVIDIA GPUs). off: eager PyTorch.",
                    },
                ),
                "devices": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Spread the model's blocks over several GPUs of this machine, e.g. cuda:0,cuda:1 "
                        "(each holds a contiguous range; what fits nowhere streams from host memory; activations "
                        "move between GPUs at the range boundaries). The first is ComfyUI's device for this model. "
                        "Empty: ComfyUI's device alone.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, dit_name: str, compute_dtype: str = "auto", **other_inputs):
        """The file's identity (size, mtime, inode): ComfyUI loads it again when the file changed on disk."""
        return host.model_fingerprint("diffusion_models", dit_name, "transformer")

    def load(self, dit_name: str, compute_dtype: str, positions: str = "official (diffusers)", matmul: str = "off",
             compile: str = "off", devices: str = ""):  # fmt: skip
        fix = "choose a complete Qwen-Image diffusion model (DiT) (.safetensors, .gguf) from models/diffusion_models"
        fix += "; a Qwen-Image-2.1 DiT loads with 'Load Qwen-Image-2.1 Diffusion Model'"
        model = load_file("dit_name", dit_name, "diffusion_models", "transformer", "DiT", fix, load_dit)
        with host.input_problem("positions", positions, f"choose one of {', '.join(native_model.POSITIONS)}"):
            convention = native_model.POSITIONS.get(positions)
            if convention is None:
                raise ValueError("unknown position convention")
        with host.input_problem("matmul", matmul, f"choose one of {', '.join(MATMUL)}"):
            if matmul not in MATMUL:
                raise ValueError("unknown matmul mode")
        with host.input_problem("compile", compile, f"choose one of {', '.join(COMPILE)}"):
            if compile not in COMPILE:
                raise ValueError("unknown compile choice")
        dtype = host.compute_dtype(compute_dtype, host.compute_device())
        native = native_model.dit_model(model, dtype, convention, matmul, compile)
        native.set_attachments("qwenpix_name", dit_name)  # for messages (the NaN diagnosis)
        native.set_attachments("qwenpix_compute", compute_dtype)
        spread_plan = spread(native, devices)  # None: ComfyUI's device alone
        plan = spread_plan or placement.describe_default_plan(model)  # shown on the node by the web extension
        lines = [weights_line(model) + " ·", plan] + ([matmul_seam.coverage(model, matmul)] if matmul != "off" else [])
        if model.config.layer3d_rope:  # issue 16: say what drives it (ComfyUI 0.3.75 has no layered latents)
            lines.insert(0, "Qwen-Image-Layered: sample it with the Qwen-Image Layered Sampler ·")
        return {"ui": {"qwenpix_plan": lines}, "result": (native,)}


class QwenPixTextEncoderLoader:
    DISPLAY_NAME = "Load Qwen-Image Text Encoder"
    CATEGORY = CATEGORY
    RETURN_TYPES = (TEXT_ENCODER,)
    OUTPUT_TOOLTIPS = ("The Qwen2.5-VL-7B condition encoder with its tokenizer.",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads Qwen2.5-VL-7B (bf16, fp8_scaled, ComfyUI's quantised files such as int8_convrot, or llama.cpp GGUF "
        "with its mmproj vision file next to it) for Qwen-Image prompts and edit images; the node shows the file's "
        "format and size."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (
                    host.model_names("text_encoders", "text_encoder"),
                    {
                        "tooltip": "A file from models/text_encoders (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors, "
                        "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf with its mmproj-F16.gguf beside it for edits) or a "
                        "diffusers repo from models/diffusers."
                    },
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, text_encoder_name: str, **other_inputs):
        """The file's identity (size, mtime, inode): ComfyUI loads it again when the file changed on disk."""
        return host.model_fingerprint("text_encoders", text_encoder_name, "text_encoder")

    def load(self, text_encoder_name: str):
        fix = (
            "choose a complete Qwen2.5-VL-7B .safetensors or llama.cpp .gguf file (e.g. qwen_2.5_vl_7b_fp8_scaled, "
            "Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf) from models/text_encoders; Qwen-Image-2.1's Qwen3-VL loads with "
            "'Load Qwen-Image-2.1 Text Encoder'"
        )
        with host.input_problem("text_encoder_name", text_encoder_name, fix):
            path = host.model_path("text_encoders", text_encoder_name, "text_encoder")
            search = [path.parent / "tokenizer", host.comfy_tokenizer_dir()]
            tokenizer = next((p for p in search if p.is_dir()), None)
            extra = host.companions("text_encoders", path)  # a GGUF's mmproj: a new or changed one reloads
            encoder = host.MODELS.get("text encoder", path, lambda: load_text_encoder(path, tokenizer), extra)
        handle = host.TextEncoderHandle(encoder, placement.text_encoder_patcher(encoder.model))
        return {"ui": {"qwenpix_plan": [weights_line(encoder.model)]}, "result": (handle,)}


class QwenPixVAELoader:
    DISPLAY_NAME = "Load Qwen-Image VAE"
    CATEGORY = CATEGORY
    RETURN_TYPES = (VAE,)
    OUTPUT_TOOLTIPS = ("The Qwen-Image VAE as a fast 2D image network.",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads qwen_image_vae.safetensors (or a diffusers vae/ folder) as a single-frame image VAE; "
        "qwen_image_layered_vae (4 channels) as the RGBA VAE of Qwen-Image-Layered."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (
                    host.model_names("vae", "vae"),
                    {"tooltip": "A file from models/vae (qwen_image_vae.safetensors) or a diffusers repo."},
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, vae_name: str, **other_inputs):
        """The file's identity (size, mtime, inode): ComfyUI loads it again when the file changed on disk."""
        return host.model_fingerprint("vae", vae_name, "vae")

    def load(self, vae_name: str):
        fix = "choose the Qwen-Image VAE (qwen_image_vae.safetensors, complete) from models/vae"
        fix += "; the Qwen-Image-2.1 VAE loads with 'Load Qwen-Image-2.1 VAE'"
        return (load_file("vae_name", vae_name, "vae", "vae", "VAE", fix, load_vae),)


UNMATCHED = ["refuse (strict)", "skip with a warning"]


class QwenPixLoraLoader:
    DISPLAY_NAME = "Qwen-Image LoRA"
    CATEGORY = CATEGORY
    RETURN_TYPES = (DIT,)
    OUTPUT_TOOLTIPS = ("The diffusion model with this LoRA added (chain several loaders to stack LoRAs).",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Adds a LoRA (diffusers/PEFT, kohya, lightx2v, ai-toolkit, musubi-tuner, DiffSynth, LyCORIS LoKr/LoHa, DoRA, "
        "full diff/diff_b deltas) to a Qwen-Image MODEL, refusing files that do not fit it. On QwenPix models it is "
        "applied exactly, at each layer's weight cast."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "A Qwen-Image MODEL (our loader, UNETLoader, another LoRA node)."}),
                "lora_name": (host.model_names("loras", "__none__"), {"tooltip": "A LoRA file from models/loras."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "How strongly the LoRA applies; 0 disables it.",
                    },
                ),
            },
            "optional": {
                "unmatched_keys": (
                    UNMATCHED,
                    {
                        "default": UNMATCHED[0],
                        "tooltip": "Keys of the file that cannot be applied to this model (no such layer, another "
                        "size, a kind QwenPix does not read): refuse the file, or apply the rest and list them.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, dit=None, lora_name: str = "", strength: float = 1.0, **other_inputs):
        """The LoRA file's identity (size, mtime, inode): ComfyUI loads it again when the file changed on disk."""
        return host.model_fingerprint("loras", lora_name, "__none__")

    def apply(self, dit, lora_name: str, strength: float, unmatched_keys: str = UNMATCHED[0]):
        strength = checks.finite_number("strength", strength, "set strength from -10 to 10 (1 is usual, 0 disables it)")
        if unmatched_keys not in UNMATCHED:
            raise checks.InputError(f"unmatched_keys: {unmatched_keys!r} is not one of {UNMATCHED}\nFix: choose one")
        lenient = unmatched_keys == UNMATCHED[1]
        fix = (
            "choose a .safetensors LoRA trained for Qwen-Image (they fit Qwen-Image and its Edit versions) from "
            "models/loras" + ("" if lenient else f", or set unmatched_keys to '{UNMATCHED[1]}' to apply what fits")
        )
        diffusion_model = host.qwen_diffusion_model(dit, "dit")
        with host.input_problem("lora_name", lora_name, fix):
            lora = read_lora(host.model_path("loras", lora_name, "__none__"), lora_targets(diffusion_model), lenient)
        if lora.skipped:
            notices.warn(_skipped_message(lora_name, lora))
        if strength == 0:
            return (dit,)
        model = dit.clone()
        model.add_patches(lora_patches(lora), strength)
        model.set_attachments("qwenpix_loras", (*(dit.get_attachment("qwenpix_loras") or ()), (lora_name, strength)))
        return (model,)


def _skipped_message(name: str, lora) -> str:
    keys = [f"{k} ({why})" for k, why in lora.skipped]
    listed = "; ".join(keys[:6]) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")
    return (
        f"LoRA {name}: skipped {len(keys)} key{'s' if len(keys) > 1 else ''} that cannot be applied to this model, "
        f"applied the other {len(lora.modules)} layers: {listed}"
    )


NODES = {
    "QwenPixDiTLoader": QwenPixDiTLoader,
    "QwenPixTextEncoderLoader": QwenPixTextEncoderLoader,
    "QwenPixVAELoader": QwenPixVAELoader,
    "QwenPixLoraLoader": QwenPixLoraLoader,
}
