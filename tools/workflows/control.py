"""Example workflows of issue 15, described as data in tools/workflows/build.py's format: ControlNet text-to-image,
inpainting with the InstantX Inpainting ControlNet, and a masked edit with crop-and-stitch.

The masked ones read `qwenpix_example_masked.png` (build.write_example_images): the house picture whose alpha is
0 over a door-sized area of the house front, so Load Image's MASK (1 - alpha) marks it for repainting.
"""

from __future__ import annotations

from tools.workflows.build import MASKED_IMAGE, NEGATIVE, POSITIVE

HF = "https://huggingface.co"
REPO_T2I = f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
REPO_EDIT = f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files"
REPO_CN = f"{HF}/Comfy-Org/Qwen-Image-InstantX-ControlNets/resolve/main/split_files/controlnet"
UNION, INPAINT = (
    "Qwen-Image-InstantX-ControlNet-Union.safetensors",
    "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors",
)
FUN = "Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors"  # VideoX-Fun's, published as it is (no repack)
REPO_FUN = f"{HF}/alibaba-pai/Qwen-Image-2512-Fun-Controlnet-Union/resolve/main"
# the negative prompt of the official 2512 workflows
NEGATIVE_2512 = (
    "低分辨率，低画质，肢体畸形，手指畸形，画面过饱和，蜡像感，人脸无细节，"
    "过度光滑，画面具有AI感。构图混乱。文字模糊，扭曲。"
)
# file name -> (models sub-folder, where the file is published)
SOURCES = {
    "qwen_image_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_T2I + "/diffusion_models"),
    "qwen_image_2512_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_T2I + "/diffusion_models"),
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", REPO_T2I + "/text_encoders"),
    "qwen_image_vae.safetensors": ("vae", REPO_T2I + "/vae"),
    UNION: ("controlnet", REPO_CN),
    INPAINT: ("controlnet", REPO_CN),
    FUN: ("controlnet", REPO_FUN),
}
TITLES = {
    "qwen_image_controlnet_union": "Qwen-Image ControlNet Union (canny, depth, pose)",
    "qwen_image_controlnet_inpaint": "Qwen-Image Inpainting ControlNet",
    "qwen_image_2512_controlnet_fun": "Qwen-Image-2512 Fun ControlNet Union (canny)",
    "qwen_image_edit_masked_crop_stitch": "Qwen-Image-Edit-2509 Masked Edit (crop and stitch)",
}
IMAGE = "qwenpix_example_1.png"  # an example input (workflows/inputs): the control image's source


def _base(dit: str, image: str = IMAGE) -> dict:
    return {
        "dit": ("QwenPixDiTLoader", {"dit_name": dit, "compute_dtype": "auto", "positions": "official (diffusers)"}),
        "te": ("QwenPixTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors"}),
        "vae": ("QwenPixVAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
        "cvae": ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}, {"title": "VAE for the control image"}),
        "ms": ("ModelSamplingAuraFlow", {"model": ("dit", 0), "shift": 3.1}),
        "img": ("LoadImage", {"image": image}),
    }


def _prompts(text: str) -> dict:
    return {
        "pos": ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": text}, POSITIVE),
        "neg": ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": " "}, NEGATIVE),
    }


def _ksampler(cond: str, latent: tuple, steps: int = 20, cfg: float = 4.0) -> tuple:
    return ("KSampler", {
        "model": ("ms", 0), "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": (cond, 0), "negative": (cond, 1), "latent_image": latent, "denoise": 1.0,
    })  # fmt: skip


def controlnet_union() -> dict:
    g = {**_base("qwen_image_fp8_e4m3fn.safetensors"), **_prompts("A modern glass house in a pine forest at dawn.")}
    g.update({
        "cn": ("QwenPixControlNetLoader", {"control_net_name": UNION, "compute_dtype": "bf16",
                                           "positions": "official (diffusers)"}),
        "hint": ("Canny", {"image": ("img", 0), "low_threshold": 0.4, "high_threshold": 0.8}),
        "apply": ("ControlNetApplyAdvanced", {
            "positive": ("pos", 0), "negative": ("neg", 0), "control_net": ("cn", 0), "image": ("hint", 0),
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ("cvae", 0)}),
        "latent": ("QwenPixEmptyLatent", {"aspect": "1:1 (1328x1328)", "width": 1328, "height": 1328, "batch_size": 1}),
        "sampler": _ksampler("apply", ("latent", 0)),
        "decode": ("VAEDecode", {"samples": ("sampler", 0), "vae": ("cvae", 0)}),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": "QwenPix/controlnet_union"}),
    })  # fmt: skip
    return g


def controlnet_fun_2512() -> dict:
    """The official `image_qwen_Image_2512_controlnet` template with the pack's loaders: Canny(0.33, 0.35), Apply
    ControlNet(1, 0, 1), 1328 x 1328, 50 steps, CFG 4, shift 3.1. The template first scales the input to 1.6 MP
    (ResizeImageMaskNode, newer ComfyUI); here Canny runs at the input's size (ComfyUI scales the edge map to the
    latent's), which keeps the example's CPU run short (see USAGE)."""
    g = _base("qwen_image_2512_fp8_e4m3fn.safetensors")
    g.update(_prompts("A modern glass house in a pine forest at dawn, soft mist between the trees."))
    g["neg"][1]["prompt"] = NEGATIVE_2512
    g.update({
        "cn": ("QwenPixControlNetLoader", {"control_net_name": FUN, "compute_dtype": "bf16",
                                           "positions": "official (diffusers)"}),
        "hint": ("Canny", {"image": ("img", 0), "low_threshold": 0.33, "high_threshold": 0.35}),
        "apply": ("ControlNetApplyAdvanced", {
            "positive": ("pos", 0), "negative": ("neg", 0), "control_net": ("cn", 0), "image": ("hint", 0),
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "vae": ("cvae", 0)}),
        "latent": ("QwenPixEmptyLatent", {"aspect": "1:1 (1328x1328)", "width": 1328, "height": 1328, "batch_size": 1}),
        "sampler": _ksampler("apply", ("latent", 0), steps=50),
        "decode": ("VAEDecode", {"samples": ("sampler", 0), "vae": ("cvae", 0)}),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": "QwenPix/controlnet_fun_2512"}),
    })  # fmt: skip
    return g


def controlnet_inpaint() -> dict:
    g = _base("qwen_image_fp8_e4m3fn.safetensors", MASKED_IMAGE)
    g.update(_prompts("A red wooden door with a brass handle."))
    g.update({
        "cn": ("QwenPixControlNetLoader", {"control_net_name": INPAINT, "compute_dtype": "bf16",
                                           "positions": "official (diffusers)"}),
        "apply": ("ControlNetInpaintingAliMamaApply", {
            "positive": ("pos", 0), "negative": ("neg", 0), "control_net": ("cn", 0), "vae": ("cvae", 0),
            "image": ("img", 0), "mask": ("img", 1), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}),
        "enc": ("VAEEncode", {"pixels": ("img", 0), "vae": ("cvae", 0)}),
        "noise_mask": ("SetLatentNoiseMask", {"samples": ("enc", 0), "mask": ("img", 1)}),
        "sampler": _ksampler("apply", ("noise_mask", 0)),
        "decode": ("VAEDecode", {"samples": ("sampler", 0), "vae": ("cvae", 0)}),
        "composite": ("ImageCompositeMasked", {"destination": ("img", 0), "source": ("decode", 0), "x": 0, "y": 0,
                                               "resize_source": False, "mask": ("img", 1)}),
        "save": ("SaveImage", {"images": ("composite", 0), "filename_prefix": "QwenPix/controlnet_inpaint"}),
    })  # fmt: skip
    return g


def masked_edit() -> dict:
    g = _base("qwen_image_edit_2509_fp8_e4m3fn.safetensors", MASKED_IMAGE)
    del g["cvae"], g["ms"]
    # Edit Encode crops Picture 1 to the mask itself (the negative gets the same mask: the same crop); Stitch
    # takes the decoded crop and the positive's crop record, which holds the original and its mask
    common = {"text_encoder": ("te", 0), "vae": ("vae", 0), "variant": "edit_plus (2509 / 2511)",
              "resize": "keep size (no shift/zoom)", "image1": ("img", 0), "mask": ("img", 1),
              "mask_mode": "crop to mask", "padding": 32, "megapixels": 1.0, "references": "whole"}  # fmt: skip
    g.update({
        "pos": ("QwenPixEditEncode", {**common, "prompt": "Turn the masked object into a bronze statue."}, POSITIVE),
        "neg": ("QwenPixEditEncode", {**common, "prompt": " "}, NEGATIVE),
        "sampler": ("QwenPixSampler", {
            "dit": ("dit", 0), "positive": ("pos", 0), "negative": ("neg", 0), "latent_image": ("pos", 1),
            "seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "schedule": "shift (ComfyUI workflows)",
            "shift": 3.0, "cfg_rescale": "CFGNorm (ComfyUI)", "denoise": 1.0}),
        "decode": ("QwenPixDecode", {"vae": ("vae", 0), "samples": ("sampler", 0), "tiling": "auto",
                                     "tile_size": 512, "overlap": 64}),
        "stitch": ("QwenPixMaskStitch", {"edited": ("decode", 0), "crop": ("pos", 2)}),
        "save": ("SaveImage", {"images": ("stitch", 0), "filename_prefix": "QwenPix/masked_edit"}),
    })  # fmt: skip
    return g


USAGE = {
    "qwen_image_controlnet_union": (
        "InstantX ControlNet Union on Qwen-Image: the control image (here ComfyUI's Canny of the input; a depth "
        "or pose map works the same) steers the layout. Strength 1, start 0, end 1 as the official workflow."
    ),
    "qwen_image_2512_controlnet_fun": (
        "The Fun ControlNet Union on Qwen-Image-2512, as the official 2512 ControlNet workflow: ComfyUI's Canny of "
        "the input (HED, depth, pose, MLSD, scribble or gray maps work the same) steers the layout; strength 1, "
        "start 0, end 1 (the model card suggests 0.70 to 0.95 for finer detail). For a small input, put "
        "ImageScaleToTotalPixels (area, 1.6 MP) before Canny, as the official workflow does. It needs the pack's "
        "diffusion model loader (its blocks use the DiT's own input layers). Lightning: the official workflow's "
        "4-step option is Qwen-Image-Lightning-4steps-V1.0 with 4 steps and CFG 1."
    ),
    "qwen_image_controlnet_inpaint": (
        "InstantX Inpainting ControlNet: paint the mask in the Mask Editor (Load Image's alpha); only the masked "
        "area is repainted (latent noise mask) and composited back onto the original."
    ),
    "qwen_image_edit_masked_crop_stitch": (
        "Masked edit with Edit-2509: paint the mask in the Mask Editor (Load Image's alpha). Edit Encode's 'crop "
        "to mask' cuts the masked area (plus 32 px) out and edits it at ~1 MP; Stitch Into Original pastes only "
        "the masked pixels back: everything outside the mask keeps its exact pixels."
    ),
}


def note_text(name: str, graph: dict) -> str:
    files = sorted({v for e in graph.values() for v in e[1].values() if isinstance(v, str) and v in SOURCES})
    lines = ["## Model files", "", "| file | put it in | download |", "| --- | --- | --- |"]
    lines += [f"| {f} | ComfyUI/models/{SOURCES[f][0]}/ | [{f}]({SOURCES[f][1]}/{f}) |" for f in files]
    return "\n".join([*lines, "", "## Usage", "", USAGE[name]])


def graphs() -> dict[str, tuple[str, dict]]:
    """name -> (note text, graph), as the other families."""
    built = {
        "qwen_image_controlnet_union": controlnet_union(),
        "qwen_image_controlnet_inpaint": controlnet_inpaint(),
        "qwen_image_2512_controlnet_fun": controlnet_fun_2512(),
        "qwen_image_edit_masked_crop_stitch": masked_edit(),
    }
    return {name: (note_text(name, g), g) for name, g in built.items()}
