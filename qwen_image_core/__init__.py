"""Qwen-Image (MMDiT, VAE, Qwen2.5-VL condition encoder) in plain PyTorch, usable with or without ComfyUI.

    from qwen_image_core import load_pipeline
    pipe = load_pipeline("Qwen-Image")                      # a diffusers repo folder
    images = pipe.generate("a cat", " ", width=1328, height=1328)   # [B, 3, H, W] in [0, 1]

The public names below are imported on first use, so `import qwen_image_core` stays cheap.
"""

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "load_dit": "mmdit",
    "load_vae": "formats.vae",
    "load_text_encoder": "text_encoder",
    "load_lora": "lora",
    "load_pipeline": "pipeline",
    "QwenImagePipeline": "pipeline",
    "make_sigmas": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
