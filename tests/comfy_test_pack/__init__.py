"""Test-only ComfyUI nodes: conditioning tensors from a seed, to drive samplers without a 7B text encoder.

Linked into the test server's custom_nodes next to the pack; never shipped.
"""

import torch


class QwenPixTestConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "tokens": ("INT", {"default": 7, "min": 1, "max": 4096}),
                "dim": ("INT", {"default": 3584, "min": 1, "max": 8192}),
            }
        }

    def make(self, seed, tokens, dim):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"QwenPixTestConditioning": QwenPixTestConditioning}


class _AnyType(str):
    """A socket type that ComfyUI's validation matches with every other type (it compares with `!=`)."""

    def __ne__(self, other):
        return False

    __hash__ = str.__hash__


ANY = _AnyType("*")


def _describe(value) -> dict:
    """What a test needs to know about a value inside the server: its type, identity and, for our DiT handles,
    the LoRA patches left on the model's layers and a checksum of its weights."""
    out = {"type": type(value).__name__}
    model = getattr(value, "model", None)
    inner = getattr(model, "diffusion_model", None)
    if inner is not None and hasattr(inner, "transformer_blocks"):  # a Qwen-Image MODEL (ModelPatcher)
        core = getattr(inner, "core", inner)
        out["model_id"] = id(core)
        out["lora_layers"] = sum(1 for m in core.modules() if getattr(m, "lora", ()) or getattr(m, "weight_fns", ()))
        out["hooks"] = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in core.modules())
        out["weights_sum"] = float(sum(t.double().sum() for t in core.state_dict().values()))
        out["handle_loras"] = len(value.patches)
    elif hasattr(value, "encoder"):  # a text encoder handle
        out["model_id"] = id(value.encoder)
    elif isinstance(value, list) and value and isinstance(value[0], list):  # CONDITIONING
        out["shape"] = list(value[0][0].shape)
        out["finite"] = bool(torch.isfinite(value[0][0]).all())
    elif isinstance(value, dict) and "samples" in value:  # LATENT
        out["shape"] = list(value["samples"].shape)
        out["finite"] = bool(torch.isfinite(value["samples"]).all())
    else:
        out["model_id"] = id(value)
    return out


class QwenPixTestSink:
    """An output node taking anything; reports `_describe(value)` in its ui output."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "sink"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (ANY,)}, "optional": {"salt": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    def sink(self, value, salt=0):
        return {"ui": {"sink": [_describe(value)]}}


class QwenPixTestFault:
    """Passes a value through; optionally interrupts now, or makes the value's model fail at its k-th forward call
    (interrupt, out-of-memory, or a plain error), from a one-shot forward pre-hook that removes itself.
    `salt` only changes the cache key, so ComfyUI re-runs everything downstream."""

    CATEGORY = "testing"
    RETURN_TYPES = (ANY,)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "value": (ANY,),
                "fault": (["none", "interrupt_now", "interrupt_at_call", "oom_at_call", "error_at_call"],),
                "call": ("INT", {"default": 1, "min": 1, "max": 10000}),
                "salt": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    def apply(self, value, fault, call, salt):
        import comfy.model_management as mm

        if fault == "interrupt_now":
            mm.interrupt_current_processing(True)
        elif fault.endswith("_at_call"):
            model = getattr(value.model, "diffusion_model", value.model)  # a MODEL: the module ComfyUI calls
            count = [0]

            def hook(module, args):
                count[0] += 1
                if count[0] < call:
                    return None
                handle.remove()
                if fault == "interrupt_at_call":
                    mm.interrupt_current_processing(True)  # raised by the sampler's step callback
                elif fault == "oom_at_call":
                    raise torch.OutOfMemoryError("test: simulated out of memory")
                else:
                    raise RuntimeError("test: simulated failure")
                return None

            handle = model.register_forward_pre_hook(hook)
        return (value,)


class QwenPixTestImage:
    """IMAGE tensors of unusual kinds: grayscale (1 channel), gray+alpha, RGBA, float16, float64, a batch."""

    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (["rgb", "gray", "gray_alpha", "rgba", "float16", "float64", "batch3"],),
                "width": ("INT", {"default": 64, "min": 1, "max": 4096}),
                "height": ("INT", {"default": 48, "min": 1, "max": 4096}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    def make(self, kind, width, height, seed):
        g = torch.Generator().manual_seed(seed)
        channels = {"gray": 1, "gray_alpha": 2, "rgba": 4}.get(kind, 3)
        batch = 3 if kind == "batch3" else 1
        image = torch.rand(batch, height, width, channels, generator=g)
        if kind in ("float16", "float64"):
            image = image.to(getattr(torch, kind))
        return (image,)


NODE_CLASS_MAPPINGS.update(
    QwenPixTestSink=QwenPixTestSink, QwenPixTestFault=QwenPixTestFault, QwenPixTestImage=QwenPixTestImage
)


class QwenPixTestBad:
    """Values no well-behaved node makes, as an any-type output: non-finite images, latents, numbers and
    conditioning, conditioning with a wrong mask or reference latents, and a plain tensor or text."""

    CATEGORY = "testing"
    RETURN_TYPES = (ANY,)
    FUNCTION = "make"
    KINDS = (
        "image_some_nan",  # 12 of 3072 values NaN
        "image_all_nan",
        "image_inf",
        "mask",  # a MASK [1, H, W] where an IMAGE belongs
        "image_5_channels",
        "latent_nan",
        "latent_4_channels",
        "float_nan",
        "float_inf",
        "float_zero",
        "cond_nan",
        "cond_mask_too_long",
        "cond_mask_text",
        "cond_refs_4_channels",
        "cond_refs_tensor",
        "cond_refs_nan",
        "cond_not_pairs",
        "cond_as_text",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (list(cls.KINDS),),
                "dim": ("INT", {"default": 256, "min": 1, "max": 8192}),
                "salt": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    def make(self, kind, dim, salt):
        nan = float("nan")
        if kind.startswith("image") or kind == "mask":
            image = torch.rand(1, 32, 32, 5 if kind == "image_5_channels" else 3)
            if kind == "image_some_nan":
                image.view(-1)[:12] = nan
            elif kind == "image_all_nan":
                image[:] = nan
            elif kind == "image_inf":
                image[0, 0, 0, :] = float("inf")
            return (image[..., 0] if kind == "mask" else image,)
        if kind.startswith("latent"):
            samples = torch.zeros(1, 4 if kind == "latent_4_channels" else 16, 1, 4, 4)
            if kind == "latent_nan":
                samples[:] = nan
            return ({"samples": samples},)
        if kind.startswith("float"):
            return ({"float_nan": nan, "float_inf": float("inf"), "float_zero": 0.0}[kind],)
        embeds = torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(salt))
        extra = {}
        if kind == "cond_nan":
            embeds[0, 0, :3] = nan
        elif kind == "cond_mask_too_long":
            extra["attention_mask"] = torch.ones(1, 9, dtype=torch.long)
        elif kind == "cond_mask_text":
            extra["attention_mask"] = "all"
        elif kind == "cond_refs_4_channels":
            extra["reference_latents"] = [torch.zeros(1, 4, 1, 4, 4)]
        elif kind == "cond_refs_tensor":
            extra["reference_latents"] = torch.zeros(1, 16, 1, 4, 4)
        elif kind == "cond_refs_nan":
            extra["reference_latents"] = [torch.full((1, 16, 1, 4, 4), nan)]
        elif kind == "cond_not_pairs":
            return ([embeds],)
        elif kind == "cond_as_text":
            return ("a cat",)
        return ([[embeds, extra]],)


NODE_CLASS_MAPPINGS["QwenPixTestBad"] = QwenPixTestBad


_COUNTERS: dict = {}  # (id(owner), target) -> {"calls": int, "handles": [hook handles]}


class QwenPixTestCallCounter:
    """Counts forward calls of a text encoder's layers / vision blocks or a VAE's coder (one call per tile) /
    stages, and interrupts processing when the count reaches `at` ("interrupt_at"). "report" returns the count
    since, removes the hooks and adds a checksum of the weights (in the ui output). Passes the value through."""

    CATEGORY = "testing"
    RETURN_TYPES = (ANY,)
    FUNCTION = "apply"
    OUTPUT_NODE = True
    TARGETS = ("text_layers", "vision_blocks", "vae_decoder", "vae_decoder_stages", "vae_encoder")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "value": (ANY,),
                "target": (list(cls.TARGETS),),
                "mode": (["interrupt_at", "report"],),
                "at": ("INT", {"default": 1, "min": 1, "max": 10000}),
                "salt": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            }
        }

    @staticmethod
    def _modules(value, target):
        model = value.encoder.model if hasattr(value, "encoder") and hasattr(value.encoder, "model") else value
        return model, {
            "text_layers": lambda: list(model.model.layers),
            "vision_blocks": lambda: list(model.visual.blocks),
            "vae_decoder": lambda: [model.decoder],
            "vae_decoder_stages": lambda: list(model.decoder.up_blocks),
            "vae_encoder": lambda: [model.encoder],
        }[target]()

    def apply(self, value, target, mode, at, salt):
        import comfy.model_management as mm

        model, modules = self._modules(value, target)
        key = (id(model), target)
        if mode == "report":
            state = _COUNTERS.pop(key, {"calls": 0, "handles": []})
            for h in state["handles"]:
                h.remove()
            hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
            weights = float(sum(t.double().sum() for t in model.state_dict().values()))
            info = {"calls": state["calls"], "hooks": hooks, "weights_sum": weights}
            return {"ui": {"counter": [info]}, "result": (value,)}
        state = _COUNTERS.setdefault(key, {"calls": 0, "handles": []})

        def hook(module, args):
            state["calls"] += 1
            if state["calls"] == at:
                mm.interrupt_current_processing(True)

        state["handles"] += [m.register_forward_pre_hook(hook) for m in modules]
        return {"ui": {"counter": [{"modules": len(modules)}]}, "result": (value,)}


NODE_CLASS_MAPPINGS["QwenPixTestCallCounter"] = QwenPixTestCallCounter


from .native import NODE_CLASS_MAPPINGS as _NATIVE_MODEL_NODES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_NATIVE_MODEL_NODES)

from .progress import NODE_CLASS_MAPPINGS as _PROGRESS_NODES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_PROGRESS_NODES)
