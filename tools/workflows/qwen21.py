"""The Qwen-Image-2.1 example workflows (issue 17), described as data in tools/workflows/build.py's format.

Five graphs on the 2.1 nodes (`nodes/qwen21.py`): text-to-image (the base checkpoint, dynamic shift, true CFG 4),
an edit with 3 references (`<image1>` .. `<image3>`, the output sized to image1, references padded not
resampled), the Turbo checkpoint's 8 published sigmas at CFG 1, background removal (an RGBA result: the
decoded alpha joined back onto the picture and saved as a PNG with alpha), and a masked edit (the pack's Crop To
Mask / Stitch Into Original around the 2.1 nodes: only the masked pixels change).
"""

from __future__ import annotations

from tools.workflows.build import MASKED_IMAGE, POSITIVE

REPO = "https://huggingface.co/Comfy-Org/Qwen-Image-2.1/resolve/main"  # no split_files/ prefix in this repo
DIT, TURBO = "qwen_image_2.1_int8_convrot.safetensors", "qwen_image_2.1_turbo_int8_convrot.safetensors"
TE, VAE = "qwen3vl_8b_int8_convrot.safetensors", "qwen_image_2.1_vae_bf16.safetensors"
# file name -> (models sub-folder, where the file is published)
SOURCES = {
    DIT: ("diffusion_models", REPO + "/diffusion_models"),
    TURBO: ("diffusion_models", REPO + "/diffusion_models"),
    TE: ("text_encoders", REPO + "/text_encoders"),
    VAE: ("vae", REPO + "/vae"),
}
IMAGES = ("qwenpix_example_1.png", "qwenpix_example_2.png", "qwenpix_example_3.png")  # workflows/inputs
TITLES = {
    "qwen_image_21_t2i": "Qwen-Image-2.1 Text to Image",
    "qwen_image_21_edit_3_references": "Qwen-Image-2.1 Edit with 3 Reference Images",
    "qwen_image_21_turbo_t2i": "Qwen-Image-2.1 Turbo Text to Image (8 steps)",
    "qwen_image_21_background_removal": "Qwen-Image-2.1 Remove Background (RGBA PNG)",
    "qwen_image_21_masked_edit": "Qwen-Image-2.1 Masked Edit (crop and stitch)",
}
T2I_PROMPT = "A cosy reading corner by a rainy window, warm lamp light, a cat asleep on a knitted blanket."
EDIT_PROMPT = "Place the house of <image1> in the landscape of <image3>, painted in the style of <image2>."
REMOVE_PROMPT = "Remove the background, and output a PNG image"  # the official template's prompt
MASKED_PROMPT = "Turn the masked object in <image1> into a bronze statue."
USAGE = """\
Qwen-Image-2.1 runs on the QwenPix 2.1 nodes; the Qwen-Image-2.1 Sampler samples exactly as the reference does.
ComfyUI's samplers work too: the loader's `model` output, Encode's `positive` / `negative` into KSampler (put
Qwen-Image-2.1 Model Sampling with Encode's latent before it for the dynamic shift; `simple` is then the
reference's schedule before its terminal stretch, up to 0.03 apart at 1024², 40 steps) or SamplerCustomAdvanced
with Qwen-Image-2.1 Sigmas (the exact schedule).

- **Prompt**: a STRING; convert the widget to an input to feed it from any node (a prompt enhancer, a text file).
- **References**: image1 .. image10 on Qwen-Image-2.1 Encode, named `<image1>` .. in the prompt. The result has
  image1's size; with resize `pad` references are padded to multiples of 32, never resampled, and the result is
  cropped back, so unedited pixels stay where they were.
- **Schedule**: `dynamic` (the base checkpoint: the shift follows the image's token count) or `turbo` (the Turbo
  checkpoint: 8 steps, CFG 1).
- **Alpha**: Qwen-Image-2.1 Decode gives the alpha as a MASK; Join Image with Alpha + Save Image keep it."""


def _loaders(dit: str) -> dict:
    return {
        "dit": ("QwenPix21DiTLoader", {"dit_name": dit, "compute_dtype": "auto"}),
        "te": ("QwenPix21TextEncoderLoader", {"text_encoder_name": TE}),
        "vae": ("QwenPix21VAELoader", {"vae_name": VAE}),
    }


def _graph(dit: str, prompt: str, images: int, steps: int, cfg: float, schedule: str, rgba: bool, prefix: str):
    """One 2.1 graph: key -> (class_type, inputs[, ui]); links are (key, output slot)."""
    g = _loaders(dit)
    encode = {"text_encoder": ("te", 0), "vae": ("vae", 0), "prompt": prompt, "negative_prompt": "",
              "width": 1024, "height": 1024, "resize": "pad", "resolution": 1024, "rgba": rgba}  # fmt: skip
    for i in range(images):
        g[f"img{i + 1}"] = ("LoadImage", {"image": IMAGES[i]})
        encode[f"image{i + 1}"] = (f"img{i + 1}", 0)
    g["encode"] = ("QwenPix21Encode", encode, POSITIVE)  # the title the thumbnail reads the prompt from
    g["sampler"] = ("QwenPix21Sampler", {"dit": ("dit", 0), "conditioning": ("encode", 0), "latent": ("encode", 1),
                    "seed": 42, "steps": steps, "cfg": cfg, "schedule": schedule})  # fmt: skip
    g["decode"] = ("QwenPix21Decode", {"vae": ("vae", 0), "samples": ("sampler", 0)})
    image = ("decode", 0)
    if rgba:
        g["alpha"] = ("JoinImageWithAlpha", {"image": ("decode", 0), "alpha": ("decode", 1)})
        image = ("alpha", 0)
    g["save"] = ("SaveImage", {"images": image, "filename_prefix": f"QwenPix/qwen21/{prefix}"})
    return g


def _masked_edit() -> dict:
    """Crop To Mask cuts Load Image's mask (1 - alpha, plus 32 px) out at ~1 MP, the 2.1 nodes edit that crop (the
    result has its size), Stitch Into Original pastes only the masked pixels back onto the original."""
    base = _graph(DIT, MASKED_PROMPT, 0, 40, 4.0, "dynamic", False, "masked_edit")
    g = _loaders(DIT)
    g["img"] = ("LoadImage", {"image": MASKED_IMAGE})
    g["crop"] = ("QwenPixMaskCrop", {"image": ("img", 0), "mask": ("img", 1), "padding": 32, "megapixels": 1.0})
    kind, inputs, ui = base["encode"]
    g["encode"] = (kind, {**inputs, "image1": ("crop", 0)}, ui)
    g["sampler"], g["decode"] = base["sampler"], base["decode"]
    g["stitch"] = ("QwenPixMaskStitch", {"edited": ("decode", 0), "crop": ("crop", 2), "original": ("img", 0),
                                         "mask": ("img", 1)})  # fmt: skip
    g["save"] = ("SaveImage", {"images": ("stitch", 0), "filename_prefix": "QwenPix/qwen21/masked_edit"})
    return g


# name -> what the note says about that example, before the shared usage text
NOTES = {
    "qwen_image_21_t2i": "Text to image with the base checkpoint: 1024x1024, 40 steps, dynamic shift, true CFG 4.",
    "qwen_image_21_edit_3_references": (
        "An edit with 3 references (Load Image 1..3 as `<image1>` .. `<image3>` in the prompt): the result has "
        "image1's size; 40 steps, true CFG 4."
    ),
    "qwen_image_21_turbo_t2i": (
        "Text to image with the Turbo checkpoint: its 8 published sigmas (schedule `turbo`, exactly 8 steps) at "
        "CFG 1, so there is no negative pass."
    ),
    "qwen_image_21_background_removal": (
        "Background removal: the official prompt with `rgba` on; Decode's alpha MASK is joined back onto the "
        "picture and Save Image writes a PNG with alpha (25 steps, CFG 1)."
    ),
    "qwen_image_21_masked_edit": (
        "Masked edit: paint the mask in the Mask Editor (Load Image's alpha). Qwen-Image Crop To Mask cuts the "
        "masked area (plus 32 px) out at ~1 MP, the 2.1 nodes edit it as `<image1>` (the result has the crop's "
        "size), Qwen-Image Stitch Into Original pastes only the masked pixels back: everything outside the mask "
        "keeps its exact pixels. 40 steps, true CFG 4."
    ),
}


def note_text(name: str) -> str:
    lines = ["## Model files", "", "| file | put it in | download |", "| --- | --- | --- |"]
    lines += [f"| {f} | ComfyUI/models/{d}/ | [{f}]({base}/{f}) |" for f, (d, base) in sorted(SOURCES.items())]
    lines += ["", "## Usage", "", NOTES[name], "", USAGE, ""]
    return "\n".join([*lines, "The bf16 files (qwen_image_2.1_bf16, qwen3vl_8b_bf16) load too."])


def graphs() -> dict[str, tuple[str, dict]]:
    """name -> (note text, graph), the official settings of each (ecosystem.md §1.5, the 2.1 templates)."""
    built = {
        "qwen_image_21_t2i": _graph(DIT, T2I_PROMPT, 0, 40, 4.0, "dynamic", False, "t2i"),
        "qwen_image_21_edit_3_references": _graph(DIT, EDIT_PROMPT, 3, 40, 4.0, "dynamic", False, "edit"),
        "qwen_image_21_turbo_t2i": _graph(TURBO, T2I_PROMPT, 0, 8, 1.0, "turbo", False, "turbo"),
        "qwen_image_21_background_removal": _graph(DIT, REMOVE_PROMPT, 1, 25, 1.0, "dynamic", True, "rgba"),
        "qwen_image_21_masked_edit": _masked_edit(),
    }
    return {name: (note_text(name), g) for name, g in built.items()}
