"""Tiny random stand-ins for the real model files, in the real format that each file name implies.

The main job and the end-to-end tests put these where a workflow expects e.g. `qwen_image_fp8_e4m3fn.safetensors`:
the graph then runs end to end through the same loaders as the real files (the images are noise). The DiT's
text width equals the tiny text encoder's hidden size, and LoRAs and ControlNets match the tiny DiT, so the files
combine. Qwen-Image-2.1 names (`qwen_image_2.1_*`, `qwen3vl_*`) get tiny 2.1 files: its DiT, its Qwen3-VL encoder
(the tokenizer comes from ComfyUI's, as for the real file) and its VAE, in the layout the name says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tools.checkpoints import controlnet, dit, dit21, lora, qwen3_vl, qwen_vl, vae, vae21

TEXT_HIDDEN = qwen_vl.TINY_TEXT["hidden_size"]
TEXT_HIDDEN_21 = qwen3_vl.TINY_TEXT["hidden_size"]  # the tiny Qwen3-VL's width: the 2.1 DiT's text width


def is_qwen21(name: str) -> bool:
    """A Qwen-Image-2.1 file by its name (DiT and VAE `qwen_image_2.1_*`, encoder `qwen3vl_*` / `qwen3_vl_*`)."""
    name = name.lower()
    return "qwen_image_2.1" in name or name.startswith(("qwen3vl", "qwen3_vl"))


def dit_config():
    return dit.tiny_config(text_dim=TEXT_HIDDEN)


def write_diffusion_model(path: Path) -> None:
    name, cfg = path.name.lower(), dit_config()
    if is_qwen21(name):  # int8_convrot: the quantised layout (widths in 256-groups); otherwise bf16
        if "int8_convrot" in name:
            dit21.write_comfy_quant(path, dit21.quant_config(text_dim=TEXT_HIDDEN_21))
        else:
            dit21.write_comfy(path, dit21.tiny_config(text_dim=TEXT_HIDDEN_21))
        return
    if "layered" in name:  # Qwen-Image-Layered: its extra timestep embedding (and layer-3D RoPE)
        cfg = dit.tiny_config(text_dim=TEXT_HIDDEN, **dit.LAYERED)
    zero_cond_t = "2511" in name
    if "fp8mixed" in name or "mixed" in name:
        dit.write_mixed(path, cfg)
    elif "fp8_scaled" in name or "scaled" in name:
        dit.write_scaled_fp8(path, cfg)
    elif "fp8" in name:
        fp8 = torch.float8_e5m2 if "e5m2" in name else torch.float8_e4m3fn
        dit.write_fp8(path, cfg, fp8=fp8)
    else:
        dit.write_comfy(path, cfg, dtype=torch.bfloat16, zero_cond_t=zero_cond_t)
    if zero_cond_t and ("fp8" in name or "mixed" in name):  # the 2511 marker also rides on quantised files
        _add_marker(path)


def _add_marker(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["__index_timestep_zero__"] = torch.empty(0, dtype=torch.bfloat16)
    save_file(tensors, str(path), metadata=meta)


def write_text_encoder(path: Path) -> None:
    if is_qwen21(path.name):
        model = qwen3_vl.reference_model(seed=0)
        if "int8_convrot" in path.name.lower():  # Comfy-Org's names: model.*, model.visual.*, lm_head
            qwen3_vl.write_quantised(path, model, "int8_convrot", layout="comfy")
        else:
            qwen3_vl.write_single(path, model, layout="comfy")
        return
    sd = qwen_vl.legacy_state_dict(qwen_vl.reference_model(seed=0))
    sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}  # never used for conditioning
    if "fp8" in path.name.lower():
        qwen_vl.write_comfy_fp8_scaled(path, sd)
    else:
        qwen_vl.write_comfy_single(path, sd)


def write_vae(path: Path) -> None:
    if is_qwen21(path.name):
        vae21.write_vae21(path.parent / ".smoke-vae21", "comfy").rename(path)  # Comfy-Org's (ComfyUI) names
        return
    channels = 4 if "layered" in path.name.lower() else 3  # qwen_image_layered_vae: the RGBA VAE
    vae.write_vae(path.parent / ".smoke-vae", "comfy", base_dim=16, image_channels=channels).rename(path)


def write_lora(path: Path) -> None:
    lora.write_lora(path, dit_config(), "lightx2v", rank=4, alpha=4.0, dtype=torch.bfloat16)


def write_controlnet(path: Path) -> None:
    """An InstantX ControlNet matching the tiny DiT; an Inpainting one (by its name) has the 4 mask channels; a
    Fun ControlNet Union (by its name) has 2 blocks entering the tiny DiT's 2 blocks."""
    if "fun-controlnet" in path.name.lower():
        controlnet.write_fun(path, controlnet.fun_config(dit_config(), 2, (0, 1)), dtype=torch.bfloat16)
        return
    extra = 4 if "inpaint" in path.name.lower() else 0
    controlnet.write_instantx(path, dit_config(), dtype=torch.bfloat16, extra_channels=extra)


# ComfyUI models sub-folder -> writer of a smoke file for a given path
WRITERS = {
    "diffusion_models": write_diffusion_model,
    "text_encoders": write_text_encoder,
    "vae": write_vae,
    "loras": write_lora,
    "controlnet": write_controlnet,
}


def write_smoke(folder: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[folder](path)
    return path
