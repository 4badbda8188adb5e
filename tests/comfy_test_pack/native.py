"""Test-only nodes: exact latent and image dumps, and, for the native-MODEL tests, a MODEL's placement/patch state."""

import os

import torch


def _save_exact(name, tensor):
    """Saves a tensor exactly (float32 .npy in the output folder), for comparisons finer than PNG."""
    import folder_paths
    import numpy as np

    np.save(os.path.join(folder_paths.get_output_directory(), f"{name}.npy"), tensor.float().cpu().numpy())
    return {"ui": {"dumps": [name]}}


class QwenPixTestDumpLatent:
    """Saves a LATENT's samples exactly."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "dump"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "latent"})}}

    def dump(self, samples, name):
        return _save_exact(name, samples["samples"])


class QwenPixTestDumpImage(QwenPixTestDumpLatent):
    """Saves an IMAGE exactly."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "dump"})}}

    def dump(self, images, name):
        return _save_exact(name, images)


class QwenPixTestModelState:
    """Reports a MODEL's registration with ComfyUI's model management and the patches on its layers."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "optional": {"salt": ("INT", {"default": 0, "min": 0})}}

    def report(self, model, salt=0):
        import comfy.model_management as mm

        inner = model.model.diffusion_model
        placement = getattr(model.model, "qwenpix_placement", None)
        state = {
            "loaded": [type(m.model).__name__ for m in mm.current_loaded_models],
            "registered": any(m.model is model.model for m in mm.loaded_models()),
            "patched_layers": sum(1 for m in inner.modules() if getattr(m, "lora", ()) or getattr(m, "weight_fns", ())),
            "placed_bytes": placement.placed_bytes if placement is not None else None,
            "weights_sum": float(sum(t.double().sum() for t in inner.state_dict().values())),
        }
        return {"ui": {"state": [state]}}


class QwenPixTestLatent:
    """A random one-frame Qwen-Image LATENT [1, 16, 1, h/8, w/8] (seeded), e.g. a reference or an img2img input."""

    CATEGORY = "testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0}),
                "width": ("INT", {"default": 64, "min": 8, "max": 4096}),
                "height": ("INT", {"default": 64, "min": 8, "max": 4096}),
            }
        }

    def make(self, seed, width, height):
        g = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(1, 16, 1, height // 8, width // 8, generator=g)},)


class QwenPixTestMask:
    """A MASK [1, H, W]: 1 on the left half, 0 on the right."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 64, "min": 1}), "height": ("INT", {"default": 64, "min": 1})}}

    def make(self, width, height):
        mask = torch.zeros(1, height, width)
        mask[:, :, : width // 2] = 1.0
        return (mask,)


class _FakeClip:
    """What CLIPTextEncode and the native Qwen text-encode nodes call on a CLIP, answering with seeded random
    Qwen-width embeddings (the real 7B encoder cannot be loaded in a test)."""

    def __init__(self, dim):
        self.dim = dim

    def tokenize(self, text, **kwargs):
        return {"text": text, "images": len(kwargs.get("images") or [])}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        g = torch.Generator().manual_seed(sum(tokens["text"].encode()) + 1000 * tokens["images"])
        n = 3 + len(tokens["text"].split())
        return [[torch.randn(1, n, self.dim, generator=g), {"pooled_output": None}]]


class QwenPixTestFakeClip:
    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dim": ("INT", {"default": 3584, "min": 1})}}

    def make(self, dim):
        return (_FakeClip(dim),)


class QwenPixTestSetCondKey:
    """Sets one key of every conditioning entry to a string (or, with as_float, a number): values no 0.3.75 node
    offers (e.g. reference_latents_method 'index_timestep_zero' of newer ComfyUI) or keys Qwen-Image never uses."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "key": ("STRING", {"default": "reference_latents_method"}),
                "value": ("STRING", {"default": "index_timestep_zero"}),
                "as_float": ("BOOLEAN", {"default": False}),
            }
        }

    def apply(self, conditioning, key, value, as_float):
        v = float(value) if as_float else value
        return ([[c, {**extra, key: v}] for c, extra in conditioning],)


CALLS: dict[str, list[int]] = {}  # name -> batch size of each diffusion-model call (test-only state)


class QwenPixTestCountCalls:
    """A clone of the MODEL whose diffusion-model calls are recorded under `name` (batch rows of each call)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "calls"})}}

    def apply(self, model, name):
        import comfy.patcher_extension as pe

        CALLS[name] = []

        def wrapper(executor, *args, **kwargs):
            CALLS[name].append(int(args[0].shape[0]))
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, f"qwenpix_test_count_{name}", wrapper)
        return (m,)


class QwenPixTestReportCalls:
    """Reports the calls recorded under `name` (after `samples`, which orders it behind the sampler)."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"samples": ("LATENT",), "name": ("STRING", {"default": "calls"})},
            "optional": {"model": ("MODEL",)},  # also report its diffusion model's prefix_fills (Qwen-Image-2.1)
        }

    def report(self, samples, name, model=None):
        fills = None if model is None else getattr(model.model.diffusion_model, "prefix_fills", None)
        return {"ui": {"calls": [CALLS.pop(name, [])], "prefix_fills": [fills]}}


NODE_CLASS_MAPPINGS = {
    "QwenPixTestCountCalls": QwenPixTestCountCalls,
    "QwenPixTestReportCalls": QwenPixTestReportCalls,
    "QwenPixTestSetCondKey": QwenPixTestSetCondKey,
    "QwenPixTestDumpLatent": QwenPixTestDumpLatent,
    "QwenPixTestDumpImage": QwenPixTestDumpImage,
    "QwenPixTestModelState": QwenPixTestModelState,
    "QwenPixTestLatent": QwenPixTestLatent,
    "QwenPixTestMask": QwenPixTestMask,
    "QwenPixTestFakeClip": QwenPixTestFakeClip,
}
