"""The Qwen-Image (v1) example workflows: text to image, the Lightning LoRA switch, the three edit models and the
QwenPix loaders on ComfyUI's native KSampler, described as data in tools/workflows/build.py's format."""

from __future__ import annotations

from tools.workflows.build import BYPASS, EXAMPLE_IMAGES, NEGATIVE, POSITIVE

# name -> the title the template browser shows (the UI file's name)
TITLES = {
    "qwen_image_t2i": "Qwen-Image Text to Image",
    "qwen_image_lightning_8step": "Qwen-Image Lightning 8 Steps",
    "qwen_image_edit": "Qwen-Image-Edit One Image",
    "qwen_image_edit_2509_two_images": "Qwen-Image-Edit-2509 Two Images",
    "qwen_image_edit_2511_three_images": "Qwen-Image-Edit-2511 Three Images Keep Size",
    "qwen_image_native_ksampler": "QwenPix Loaders with Native KSampler",
}
HF = "https://huggingface.co"
REPO_T2I = f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
REPO_EDIT = f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files"
LIGHTNING = f"{HF}/lightx2v/Qwen-Image-Lightning/resolve/main"
# file name -> (models sub-folder, where the file is published)
SOURCES = {
    "qwen_image_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_T2I + "/diffusion_models"),
    "qwen_image_edit_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_image_edit_2511_bf16.safetensors": ("diffusion_models", REPO_EDIT + "/diffusion_models"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", REPO_T2I + "/text_encoders"),
    "qwen_image_vae.safetensors": ("vae", REPO_T2I + "/vae"),
    "Qwen-Image-Lightning-8steps-V1.0.safetensors": ("loras", LIGHTNING),
}
MODELS = {name: (folder, f"{base}/{name}") for name, (folder, base) in SOURCES.items()}


def _loaders(dit: str) -> dict:
    return {
        "dit": ("QwenPixDiTLoader", {"dit_name": dit, "compute_dtype": "auto", "positions": "official (diffusers)"}),
        "te": ("QwenPixTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors"}),
        "vae": ("QwenPixVAELoader", {"vae_name": "qwen_image_vae.safetensors"}),
    }


def _sampler(
    model: str, latent: tuple, steps: int, cfg: float, schedule: str, shift: float, rescale: str, ui: dict | None = None
) -> tuple:
    return (
        "QwenPixSampler",
        {
            "dit": (model, 0),
            "positive": ("pos", 0),
            "negative": ("neg", 0),
            "latent_image": latent,
            "seed": 42,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "schedule": schedule,
            "shift": shift,
            "cfg_rescale": rescale,
            "denoise": 1.0,
        },
        *([ui] if ui else []),
    )


def _tail(prefix: str) -> dict:
    return {
        "decode": (
            "QwenPixDecode",
            {"vae": ("vae", 0), "samples": ("sampler", 0), "tiling": "auto", "tile_size": 512, "overlap": 64},
        ),
        "save": ("SaveImage", {"images": ("decode", 0), "filename_prefix": f"QwenPix/{prefix}"}),
    }


def _edit(dit: str, images: int, variant: str, resize: str, prompt: str, steps: int, cfg: float, shift: float) -> dict:
    g = _loaders(dit)
    refs = {}
    for i in range(images):
        g[f"img{i + 1}"] = ("LoadImage", {"image": EXAMPLE_IMAGES[i]})
        refs[f"image{i + 1}"] = (f"img{i + 1}", 0)
    common = {"text_encoder": ("te", 0), "vae": ("vae", 0), "variant": variant, "resize": resize, **refs}
    g["pos"] = ("QwenPixEditEncode", {**common, "prompt": prompt}, POSITIVE)
    g["neg"] = ("QwenPixEditEncode", {**common, "prompt": " "}, NEGATIVE)
    g["sampler"] = _sampler("dit", ("pos", 1), steps, cfg, "shift (ComfyUI workflows)", shift, "CFGNorm (ComfyUI)")
    return g


def graphs() -> dict[str, tuple[str, dict]]:
    """name -> (note text, graph); a graph maps a key to (class_type, inputs); links are (key, output slot)."""
    t2i = _loaders("qwen_image_fp8_e4m3fn.safetensors")
    t2i["pos"] = (
        "QwenPixTextEncode",
        {
            "text_encoder": ("te", 0),
            "prompt": (
                'A cozy coffee shop at dusk, a chalkboard sign reading "QwenPix Coffee", '
                "warm light through the window, a cat asleep on the counter, Ultra HD, 4K, cinematic composition."
            ),
        },
        POSITIVE,
    )
    t2i["neg"] = ("QwenPixTextEncode", {"text_encoder": ("te", 0), "prompt": " "}, NEGATIVE)
    # the official template's size, steps, CFG, shift; no rescale (its graph has no CFGNorm)
    t2i["latent"] = (
        "QwenPixEmptyLatent",
        {"aspect": "1:1 (1328x1328)", "width": 1328, "height": 1328, "batch_size": 1},
    )
    lightning = _lightning_switch(dict(t2i))
    t2i["sampler"] = _sampler("dit", ("latent", 0), 20, 4.0, "shift (ComfyUI workflows)", 3.1, "none")

    edit = _edit(
        "qwen_image_edit_fp8_e4m3fn.safetensors",
        1,
        "edit (original Qwen-Image-Edit)",
        "official (~1 MP)",
        "Change the sky to a starry night and add a full moon.",
        20,
        2.5,
        3.0,
    )
    e2509 = _edit(
        "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
        2,
        "edit_plus (2509 / 2511)",
        "official (~1 MP)",
        "Put the object from Picture 2 on the table in Picture 1.",
        20,
        4.0,
        3.0,
    )
    e2511 = _edit(
        "qwen_image_edit_2511_bf16.safetensors",
        3,
        "edit_plus (2509 / 2511)",
        "keep size (no shift/zoom)",
        "Paint the house in Picture 1 with the colours of Picture 2 and the texture of Picture 3.",
        40,
        4.0,
        3.1,
    )
    native = _native_ksampler(t2i)
    for g, prefix in (
        (t2i, "t2i"),
        (lightning, "lightning"),
        (edit, "edit"),
        (e2509, "edit_2509"),
        (e2511, "edit_2511"),
        (native, "native_ksampler"),
    ):
        g.update(_tail(prefix))
    official = (
        "Text to image at 1328x1328, 20 steps, true CFG 4, shift 3.1, no CFG rescale: the settings of the "
        "official ComfyUI workflow. The seed is randomised after each run (set 'control after generate' to "
        "fixed to repeat an image)."
    )
    return {
        "qwen_image_t2i": (note(t2i, official), t2i),
        "qwen_image_lightning_8step": (
            note(lightning, LIGHTNING_USAGE),
            lightning,
        ),
        "qwen_image_edit": (
            note(
                edit,
                "Qwen-Image-Edit, one reference. 'keep size' on the encoders keeps the "
                "image's own pixels and avoids shifted/zoomed results.",
            ),
            edit,
        ),
        "qwen_image_edit_2509_two_images": (
            note(e2509, "Edit-2509 with two references (Picture 1, Picture 2)."),
            e2509,
        ),
        "qwen_image_edit_2511_three_images": (
            note(e2511, "Edit-2511 with three references, keeping the first image's size (the canvas is Picture 1)."),
            e2511,
        ),
        "qwen_image_native_ksampler": (note(native, NATIVE_USAGE), native),
    }


LIGHTNING_USAGE = """\
Lightning LoRA on/off, as the official workflow's switch: two groups, one of them bypassed.

- **Lightning (on)**: the Lightning LoRA and a sampler with 8 steps, CFG 1 (the official Lightning settings).
- **Standard (off)**: a sampler with 20 steps, CFG 4, the settings without the LoRA.

To switch, bypass the group you do not want and un-bypass the other (right-click the group > Bypass Group
Nodes, or select it and press Ctrl+B). Exactly one group should be active: a bypassed sampler passes its
latent through. Both use shift 3.1 as the official workflow does (the sampler's 'lightning' schedule is the
LoRA authors' plain shift 3). Use the 4-step LoRA with steps 4."""

NATIVE_USAGE = """\
The QwenPix loaders driving ComfyUI's own KSampler: ModelSamplingAuraFlow shift 3.1, euler / simple, 20 steps,
cfg 4, 1328x1328 (the settings of the Comfy-Org Qwen-Image workflow).

### Which sampler?

- **KSampler** (this workflow): the QwenPix diffusion model is a native MODEL, so KSampler, KSamplerAdvanced,
  SamplerCustomAdvanced and ComfyUI's other sampling nodes work on it, as do model patches (CFGNorm,
  EasyCache, LazyCache) and LoRA stacks (LoraLoaderModelOnly or Qwen-Image LoRA) between the loader and the
  sampler. Use it to combine QwenPix with the rest of a ComfyUI workflow.
- **Qwen-Image Sampler** (the other examples): the same ComfyUI samplers and schedulers, plus in one node the
  official resolution-dependent (dynamic) schedule, diffusers' per-token CFG rescale and the Lightning
  schedule.

Both samplers run cond and uncond as one batched pass on a QwenPix model, even when the prompts differ in
length (ComfyUI's own Qwen-Image model, from UNETLoader, runs them one after the other then).

### Seeds from native workflows

Set **positions** on the diffusion-model loader to "ComfyUI native" to reproduce an image of a native
ComfyUI Qwen-Image workflow from its seed: ComfyUI's model places odd token grids (1328 px = 83 tokens) and
edit text tokens differently from the official code, which the default "official (diffusers)" follows.
"ComfyUI native" also batches as ComfyUI does (prompts of different lengths in separate passes)."""


def _lightning_switch(g: dict) -> dict:
    """The text-to-image graph with a Lightning on/off switch (the bypass pattern): the standard sampler (bypassed)
    feeds its latent input through to the Lightning sampler, which samples with the LoRA; bypassing the Lightning
    group instead passes the standard sampler's result through."""
    lora = {"dit": ("dit", 0), "lora_name": "Qwen-Image-Lightning-8steps-V1.0.safetensors", "strength": 1.0}
    on, off = "Lightning (on): 8 steps, CFG 1", "Standard (off): 20 steps, CFG 4"
    schedule = "shift (ComfyUI workflows)"
    g["standard"] = _sampler(
        "dit",
        ("latent", 0),
        20,
        4.0,
        schedule,
        3.1,
        "none",
        {"title": "Sampler (standard)", "mode": BYPASS, "group": off},
    )
    g["lora"] = ("QwenPixLoraLoader", lora, {"title": "Lightning LoRA", "group": on, "col": 3})
    g["sampler"] = _sampler(
        "lora", ("standard", 0), 8, 1.0, schedule, 3.1, "none", {"title": "Sampler (Lightning)", "group": on}
    )
    return g


def _native_ksampler(t2i: dict) -> dict:
    """Our loaders and text encoders, ComfyUI's ModelSamplingAuraFlow + KSampler + EmptySD3LatentImage."""
    g = {key: t2i[key] for key in ("dit", "te", "vae", "pos", "neg")}
    g["shift"] = ("ModelSamplingAuraFlow", {"model": ("dit", 0), "shift": 3.1})
    g["latent"] = ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1})
    g["sampler"] = (
        "KSampler",
        {
            "model": ("shift", 0),
            "seed": 42,
            "steps": 20,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": ("pos", 0),
            "negative": ("neg", 0),
            "latent_image": ("latent", 0),
            "denoise": 1.0,
        },
    )
    return g


def note(graph: dict, usage: str) -> str:
    files = sorted({v for entry in graph.values() for v in entry[1].values() if isinstance(v, str) and v in MODELS})
    lines = ["## Model files", "", "| file | put it in | download |", "| --- | --- | --- |"]
    lines += [f"| {f} | ComfyUI/models/{MODELS[f][0]}/ | [{f}]({MODELS[f][1]}) |" for f in files]
    lines += [
        "",
        "## Usage",
        "",
        usage,
        "",
        "Any Qwen-Image file format works in the loaders: bf16, fp8, scaled fp8, or a diffusers folder in "
        "models/diffusers/.",
    ]
    return "\n".join(lines)
