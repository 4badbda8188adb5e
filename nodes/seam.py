"""The node seam: what every QwenPix node does around its own function, applied where the mappings are built.

1. Inputs of the pack's handle types (DiT, text encoder, VAE) are checked to be that handle: ComfyUI's type
   check is skipped for any-type ("*") sockets, and a VAE arriving where a DiT belongs would otherwise fail deep
   inside with an AttributeError.
2. Messages of errors leaving a node carry no absolute server path (`host.public_error`): model files are shown
   as `models/<folder>/<name>`, anything else by its base name. The exception type is kept.
"""

from __future__ import annotations

import functools

import comfy.model_patcher

from ..qwen_image_core.vae import ImageVAE
from . import checks, host
from .loaders import DIT, TEXT_ENCODER, VAE

# handle type -> (class, what it is, the node it comes from). The DiT, a native MODEL, is only checked to be a
# MODEL here; `host.qwen_diffusion_model` tells whether it is Qwen-Image.
HANDLES = {
    DIT: (comfy.model_patcher.ModelPatcher, "a diffusion MODEL", "Load Qwen-Image Diffusion Model"),
    TEXT_ENCODER: (host.TextEncoderHandle, "a Qwen-Image text encoder", "Load Qwen-Image Text Encoder"),
    VAE: (ImageVAE, "a Qwen-Image VAE", "Load Qwen-Image VAE"),
}


def handle_inputs(node_cls) -> dict[str, str]:
    """{input name: handle type} of a node class, from its INPUT_TYPES."""
    types = node_cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
            if isinstance(kind, str) and kind in HANDLES:
                out[name] = kind
    return out


def wrap(node_cls: type) -> type:
    """A subclass of a V1 node class whose FUNCTION checks handle inputs and cleans error messages."""
    function = getattr(node_cls, node_cls.FUNCTION)
    handles: list[dict[str, str]] = []  # computed at the first call (INPUT_TYPES lists model folders)

    @functools.wraps(function)
    def run(self, *args, **kwargs):
        if not handles:
            handles.append(handle_inputs(node_cls))
        try:
            for name, kind in handles[0].items():
                if name in kwargs and kwargs[name] is not None:
                    checks.check_handle(name, kwargs[name], *HANDLES[kind])
            return function(self, *args, **kwargs)
        except Exception as e:
            clean = host.public_error(e)
            if clean is e:
                raise
            raise clean from e

    return type(node_cls.__name__, (node_cls,), {node_cls.FUNCTION: run, "__module__": node_cls.__module__})
