"""The Qwen-Image-Layered example workflow (issue 16), described as data in tools/workflows/build.py's format.

A picture (Load Image, with its alpha as the MASK) is decomposed into 4 RGBA layers by the Layered Sampler
(the official settings: ~640² pixels, 50 steps, true CFG 4 with the negative ' '), decoded by Layered Decode
and saved with SaveImage, one PNG with alpha per layer, plus the composite.
"""

from __future__ import annotations

NAME = "qwen_image_layered"
TITLES = {NAME: "Qwen-Image-Layered Decompose into RGBA Layers"}  # name -> the template browser's title
REPO = "https://huggingface.co/Comfy-Org/Qwen-Image-Layered_ComfyUI/resolve/main/split_files"
REPO_T2I = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
# file name -> (models sub-folder, where the file is published)
SOURCES = {
    "qwen_image_layered_bf16.safetensors": ("diffusion_models", REPO + "/diffusion_models"),
    "qwen_image_layered_vae.safetensors": ("vae", REPO + "/vae"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", REPO_T2I + "/text_encoders"),
}
IMAGE = "qwenpix_example_1.png"  # one of the example inputs (workflows/inputs)
CAPTION = (
    "A simple flat drawing of a cream-coloured house with a dark red roof standing on a strip of green grass, "
    "in front of a plain blue sky."
)
USAGE = """\
Decomposes the picture into 4 transparent RGBA layers (Qwen-Image-Layered) and saves each layer as a PNG
with its alpha channel, plus the composite the model reconstructed.

- **Caption**: the model expects a description of the picture. The reference pipeline writes one with
  Qwen2.5-VL when the prompt is empty; QwenPix has no captioner, so describe your image (English or Chinese).
- **Settings**: about 640x640 pixels at the picture's aspect (1024 for more detail, slower), 50 steps, CFG 4
  with the negative ' ' (the official ones; the model is slow: each step runs the layers and the picture).
- **Outputs**: `layers` is an RGBA batch (Save Image writes RGBA PNGs), `layer_masks` each alpha as a MASK
  (1 - alpha, ComfyUI's convention). ComfyUI 0.3.75 itself has no layered latents, so this model runs only on
  the Layered Sampler, not on KSampler."""


def graph() -> dict:
    """The graph: key -> (class_type, inputs[, ui]); links are (key, output slot)."""
    return {
        "dit": (
            "QwenPixDiTLoader",
            {
                "dit_name": "qwen_image_layered_bf16.safetensors",
                "compute_dtype": "auto",
                "positions": "official (diffusers)",
            },
        ),
        "te": ("QwenPixTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors"}),
        "vae": ("QwenPixVAELoader", {"vae_name": "qwen_image_layered_vae.safetensors"}),
        "img": ("LoadImage", {"image": IMAGE}),
        "pos": ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": CAPTION}, {"title": "Caption"}),
        "neg": ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": " "}, {"title": "Negative Prompt"}),
        "sampler": (
            "QwenPixLayeredSampler",
            {
                "dit": ("dit", 0),
                "vae": ("vae", 0),
                "positive": ("pos", 0),
                "negative": ("neg", 0),
                "image": ("img", 0),
                "mask": ("img", 1),
                "layers": 4,
                "resolution": "640",
                "seed": 42,
                "steps": 50,
                "cfg": 4.0,
                "cfg_normalize": False,
            },
        ),  # fmt: skip
        "decode": (
            "QwenPixLayeredDecode",
            {"vae": ("vae", 0), "samples": ("sampler", 0), "tiling": "auto", "tile_size": 512, "overlap": 64},
        ),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": "QwenPix/layered/layer"}),
        "save_composite": ("SaveImage", {"images": ("decode", 2), "filename_prefix": "QwenPix/layered/composite"}),
    }


def note_text() -> str:
    lines = ["## Model files", "", "| file | put it in | download |", "| --- | --- | --- |"]
    lines += [f"| {f} | ComfyUI/models/{d}/ | [{f}]({base}/{f}) |" for f, (d, base) in sorted(SOURCES.items())]
    lines += ["", "## Usage", "", USAGE, "", "The fp8 file (qwen_image_layered_fp8mixed) works in the loader too."]
    return "\n".join(lines)


def graphs() -> dict[str, tuple[str, dict]]:
    """name -> (note text, graph), as the other families."""
    return {NAME: (note_text(), graph())}
