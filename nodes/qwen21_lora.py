"""A LoRA on the Qwen-Image-2.1 MODEL, in every key spelling that names the DiT's own modules.

ComfyUI's LoraLoaderModelOnly maps a LoRA's keys through `comfy.lora.model_lora_keys_unet`, which for a model
class it does not know reads only `diffusion_model.<module>` and kohya's `lora_unet_<module_with_underscores>`;
any other key (the diffusers / PEFT `transformer.<module>` spelling trainers write) is skipped with a log line.
This node adds the `transformer.` and bare `<module>` spellings (the module names are the checkpoint's, so
they map one to one), refuses a file with any key that names no module of this model (listing them), and
hands ComfyUI's own patches (`comfy.lora.load_lora`: LoRA, LoHa, LoKr, DoRA, diff) to the MODEL, which
applies them at the weight cast as for LoraLoaderModelOnly.
"""

from __future__ import annotations

import comfy.lora
import comfy.utils
import folder_paths

from . import host
from .qwen21_loaders import CATEGORY
from .qwen21_model import QwenPix21Model

PREFIX = "diffusion_model."
SPELLINGS = ("transformer.{}", "{}", "lycoris_{}")  # besides ComfyUI's own; lycoris_ with underscores


def lora_key_map(model: QwenPix21Model) -> dict[str, str]:
    """{LoRA key base: model state-dict key} for every weight and bias of the 2.1 DiT."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    for k in model.state_dict():
        if not k.startswith(PREFIX) or not k.endswith(".weight"):
            continue
        base = k[len(PREFIX) : -len(".weight")]
        for spelling in SPELLINGS:
            key_map[spelling.format(base.replace(".", "_") if spelling.startswith("lycoris") else base)] = k
    return key_map


def unmatched_keys(lora: dict, key_map: dict[str, str]) -> list[str]:
    """The file's keys whose base (the key less its LoRA suffix) names no weight of the model."""
    out = []
    for key in lora:
        parts = key.split(".")
        if not any(".".join(parts[:i]) in key_map for i in range(len(parts) - 1, 0, -1)):
            out.append(key)
    return out


class QwenPix21LoRA:
    DISPLAY_NAME = "Qwen-Image-2.1 LoRA"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Qwen-Image-2.1 MODEL with the LoRA (chainable).",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Applies a LoRA to the Qwen-Image-2.1 MODEL: keys as ComfyUI writes them (diffusion_model.<module>, "
        "lora_unet_), as diffusers / PEFT trainers do (transformer.<module>) or bare module names; LoRA, LoHa, "
        "LoKr, DoRA and diff patches. A file with keys that name no module of the model is refused, listing them."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of Load Qwen-Image-2.1 Diffusion Model."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA from models/loras."}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip": "LoRA strength."},
                ),
            }
        }

    def apply(self, model, lora_name, strength):
        if not isinstance(getattr(model, "model", None), QwenPix21Model):
            raise host.InputError(
                "model: not a Qwen-Image-2.1 MODEL\nFix: connect the MODEL output of Load Qwen-Image-2.1 Diffusion "
                "Model (a v1 Qwen-Image MODEL goes to the Qwen-Image LoRA node)"
            )
        if strength == 0:
            return (model,)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        key_map = lora_key_map(model.model)
        bad = unmatched_keys(lora, key_map)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise host.InputError(
                f"lora_name: {len(bad)} of the {len(lora)} keys of {lora_name} name no module of this Qwen-Image-2.1 "
                f"model: {shown}\nFix: use a LoRA trained for Qwen-Image-2.1 (keys transformer.<module>, "
                "diffusion_model.<module> or lora_unet_<module>)"
            )
        patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
        m = model.clone()
        m.add_patches(patches, strength)
        return (m,)


NODES = {"QwenPix21LoRA": QwenPix21LoRA}
