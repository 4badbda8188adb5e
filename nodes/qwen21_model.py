"""The Qwen-Image-2.1 DiT as a ComfyUI MODEL: what KSampler, SamplerCustomAdvanced, CFGGuider and
LoraLoaderModelOnly drive when given the 2.1 loader's MODEL output.

ComfyUI 0.3.75 has no Qwen-Image-2.1 model class, so `QwenPix21Model` is a plain `comfy.model_base.BaseModel`
(flow matching, CONST prediction) with the 2.1 latent format (64 channels, 16x, already normalised by our
VAE: no scaling) and `qwen_image_core`'s DiT21 as its `diffusion_model` (`NativeDiT21`: the same modules, so
the state-dict keys are `diffusion_model.<our module names>`). No model math lives here.

Model sampling. `ModelSampling21` is ComfyUI's discrete flow sampling (multiplier 1: the DiT reads sigma)
with the shift e^mu of the 2.1 dynamic-shift rule (`qwen21.schedule.mu`) for a token count: 1024² (4096
tokens) as loaded; `Qwen-Image-2.1 Model Sampling` sets it for a latent. ComfyUI's `simple` scheduler then
gives the reference's shifted linspace(1, 1/N, N) before its last step, the rescaling of 1 - sigma that puts
the last sigma at 0.02 (it depends on N, which a model sampling cannot know; it moves every sigma: by up to
0.03 at 1024² and 0.07 at 2048² with 40 steps, 0.2 with 8); `Qwen-Image-2.1 Sigmas` gives the reference's
sigmas exactly for SamplerCustomAdvanced. A run whose latent is not the size the shift
was set for, on sigmas other than the exact ones, is warned about.

Conditioning. Qwen-Image-2.1 Encode's CONDITIONING carries the Qwen3-VL features as the tensor and, under
`qwenpix21`, what else the DiT needs (image slots, reference latents, text mask). `extra_conds` turns each
entry into one `CONDPrefix21` (a constant per entry: entries never batch together, so each has its own
prefix). Prefix K/V cache: computed at an entry's first call of a sampling run and reused by every later
step of that run; the store lives in the run's own model options (made by an OUTER_SAMPLE wrapper), keyed
by the entry object, dtype and device, so nothing outlives the run. With conditioning weight hooks
(CreateHookLora...) the weights may change between calls: no cache then (every step runs the prefix).
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base
import torch
from torch import nn

from ..qwen_image_core.qwen21.dit import DiT21
from ..qwen_image_core.qwen21.plan import Workload21, plan_dit21
from ..qwen_image_core.qwen21.plan import activation_bytes as activation_bytes21
from ..qwen_image_core.qwen21.sampler import Condition21
from ..qwen_image_core.qwen21.schedule import TURBO_SIGMAS, VAE_SCALE, mu, sigmas, target_tokens, turbo_sigmas
from . import notices
from .native_model import SAMPLER_KEYS, host_attention
from .patcher import QwenPixPatcher, placed_patcher

PAYLOAD = "qwenpix21"  # the CONDITIONING key Qwen-Image-2.1 Encode sets (a Payload21)
COND_KEY = "qwenpix21_prefix"  # the model condition (CONDPrefix21) handed to NativeDiT21
STORE_KEY = "qwenpix21_prefix_caches"  # transformer_options entry: the run's PrefixStore
RUN_WRAPPER = "qwenpix21_prefix_run"
DEFAULT_TOKENS = 4096  # the shift a loaded MODEL starts with: 1024 x 1024 pixels (mu 0.69)
IGNORED_KEYS = {"pooled_output"}  # set by ComfyUI's conditioning nodes; the 2.1 DiT has no pooled input


class LatentFormat21(comfy.latent_formats.LatentFormat):
    """The 2.1 VAE's latents: 64 channels, 16x; our VAE normalises them itself (scale 1, no shift)."""

    latent_channels = 64
    latent_dimensions = 2


class Config21(comfy.supported_models_base.BASE):
    """What ComfyUI's BaseModel reads of a model family (no detection: our loader builds it)."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    sampling_settings = {"multiplier": 1.0, "shift": math.exp(mu(DEFAULT_TOKENS))}  # the DiT reads sigma
    latent_format = LatentFormat21
    memory_usage_factor = 2.0  # unused: memory_required is ours
    supported_inference_dtypes = [torch.bfloat16, torch.float32, torch.float16]


class ModelSampling21(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    """Flow-matching sampling with the 2.1 dynamic shift of a `tokens`-token target (shift = e^mu(tokens))."""

    def __init__(self, tokens: int = DEFAULT_TOKENS):
        super().__init__(None)
        self.set_tokens(tokens)

    def set_tokens(self, tokens: int) -> None:
        self.tokens = int(tokens)
        self.set_parameters(shift=math.exp(mu(self.tokens)), multiplier=1.0)


# ---------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------


class Payload21:
    """What a 2.1 CONDITIONING entry carries besides its features: image slots [L] bool or None, reference
    latents [1, 64, h, w] (CPU, float32) or None, text mask [1, L] bool or None, and the feature shape it
    was made with (to name a tensor changed by a node that does not know 2.1, e.g. ConditioningConcat)."""

    def __init__(self, image_slots, ref_latents, txt_mask, shape):
        self.image_slots, self.ref_latents, self.txt_mask, self.shape = image_slots, ref_latents, txt_mask, shape


def conditioning(c: Condition21) -> list:
    """A core Condition21 (batch 1) as a ComfyUI CONDITIONING list."""
    payload = Payload21(c.image_slots, c.ref_latents, c.txt_mask, tuple(c.txt.shape))
    return [[c.txt, {PAYLOAD: payload}]]


def prefix_tokens(text_tokens: int, image_slots, ref_latents) -> int:
    """The prefix length the DiT attends to: the condition's tokens, its image slots replaced by the references'
    latent tokens (for the memory estimate)."""
    slots = 0 if image_slots is None else int(image_slots.sum())
    return text_tokens - slots + sum(r.shape[-2] * r.shape[-1] for r in ref_latents or [])


class CONDPrefix21(comfy.conds.CONDConstant):
    """One entry's Condition21, passed through as the same object at every step (the prefix cache's key);
    entries never concatenate (each has its own prefix). size(): [1, prefix tokens] for the memory estimate."""

    def can_concat(self, other) -> bool:
        return self.cond is other.cond

    def size(self):
        return [1, prefix_tokens(self.cond.txt.shape[1], self.cond.image_slots, self.cond.ref_latents)]


class PrefixStore:
    """The prefix caches of one sampling run: {(entry id, dtype, device): (entry, PrefixCache)}; `enabled` False when
    the weights may change between calls (conditioning weight hooks)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.caches, self.fills = enabled, {}, 0

    def get(self, entry, dtype, device, fill):
        """The cache of `entry` (the run's Condition21 object) in `dtype` on `device`, filled at the first call."""
        if not self.enabled:
            return None
        key = (id(entry), dtype, str(device))
        if key not in self.caches:
            self.caches[key] = (entry, fill())  # the entry kept alive with it: its id cannot be reused
            self.fills += 1
        return self.caches[key][1]


def prefix_run_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a fresh PrefixStore in this run's model options (a per-run copy), dropped after."""
    guider = executor.class_obj
    hooks = any(c.get("hooks") is not None for cs in guider.conds.values() for c in cs)
    options = guider.model_options.setdefault("transformer_options", {})
    store = options[STORE_KEY] = PrefixStore(enabled=not hooks)
    _check_shift(guider, args[0], args[3])
    try:
        return executor(*args, **kwargs)
    finally:
        store.caches.clear()
        options.pop(STORE_KEY, None)


def _check_shift(guider, noise: torch.Tensor, used: torch.Tensor) -> None:
    """Warn when the model's shift was set for another target size and the sigmas are not the exact ones."""
    ms = guider.model_patcher.get_model_object("model_sampling")
    if not isinstance(ms, ModelSampling21) or noise.ndim != 4:
        return  # another model sampling (ModelSamplingAuraFlow ...): the user chose the shift
    h, w = noise.shape[-2] * VAE_SCALE, noise.shape[-1] * VAE_SCALE
    tokens = target_tokens(h, w)
    if tokens == ms.tokens:
        return
    steps = len(used) - 1
    if steps < 1:
        return
    exact = [sigmas(steps, tokens)] + ([turbo_sigmas()] if steps == len(TURBO_SIGMAS) else [])
    if any(e.shape == used.shape and torch.allclose(e, used.float().cpu(), atol=1e-6) for e in exact):
        return
    side = round(math.sqrt(ms.tokens)) * VAE_SCALE
    notices.warn(
        f"the Qwen-Image-2.1 MODEL's shift is set for {ms.tokens} tokens (about {side}x{side}), this latent is "
        f"{w}x{h} ({tokens} tokens): connect Qwen-Image-2.1 Model Sampling with this latent (or use "
        "Qwen-Image-2.1 Sigmas) for the model's own schedule"
    )


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class NativeDiT21(nn.Module):
    """ComfyUI's `diffusion_model` interface over a DiT21: same modules, same keys, ComfyUI's arguments.
    x [B, 64, H, W] latent, timestep [B] sigma, qwenpix21_prefix: the entry's Condition21 -> velocity."""

    def __init__(self, dit: DiT21, dtype: torch.dtype):
        super().__init__()
        for name, child in dit.named_children():  # shared, not copied: the DiT21 and this module are one model
            self.add_module(name, child)
        self.config, self.dtype = dit.config, dtype
        self.core_forward = dit.forward  # bound methods of the core model, computing with the same modules
        self.core_prefill = dit.prefill
        self.prefix_fills = 0  # prefix caches computed so far (tests read it: once per condition and run)

    def forward(self, x, timestep, context=None, transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options
        )
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, transformer_options, **kwargs
        )

    def _forward(self, x, timestep, context=None, transformer_options=None, control=None, **kwargs):
        cond = kwargs.pop(COND_KEY, None)
        if cond is None:
            raise ValueError(
                "the Qwen-Image-2.1 MODEL was given no Qwen-Image-2.1 conditioning: connect the positive / negative "
                "outputs of Qwen-Image-2.1 Encode"
            )
        if kwargs:
            notices.warn(f"the Qwen-Image-2.1 model was given inputs it does not use: {', '.join(sorted(kwargs))}")
        options = transformer_options or {}
        _check_options(options, control)
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"the latent is {list(x.shape)}; the Qwen-Image-2.1 MODEL samples [B, {self.config.in_channels}, h, w] "
                "2.1 latents: use the latent output of Qwen-Image-2.1 Encode"
            )
        attend = host_attention(options)
        dt, device = x.dtype, x.device
        store = options.get(STORE_KEY)

        def fill():
            self.prefix_fills += 1
            c = _to(cond, device, dt)
            return self.core_prefill(*c.args(), dtype=dt, attention_fn=attend)

        cache = None if store is None else store.get(cond, dt, device, fill)
        if cache is not None:
            return self.core_forward(x, timestep, cache=cache, attention_fn=attend)
        return self.core_forward(x, timestep, *_to(cond, device, dt).args(), attention_fn=attend)


def _to(c: Condition21, device, dtype) -> Condition21:
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    refs = None if c.ref_latents is None else [r.to(device, dtype) for r in c.ref_latents]
    return Condition21(c.txt.to(device, dtype), mv(c.image_slots), refs, mv(c.txt_mask))


def _check_options(options: dict, control) -> None:
    """Say what the transformer options ask for that the 2.1 model does not do (nothing is applied silently)."""
    for kind, patches in options.get("patches", {}).items():
        if patches:
            notices.warn(f"model patch '{kind}' is not supported by the Qwen-Image-2.1 model and has no effect")
    for group, patches in options.get("patches_replace", {}).items():
        for key in patches:
            notices.warn(f"block replacement {group}/{key} is not supported by the Qwen-Image-2.1 model; ignored")
    if "rope_options" in options:
        notices.warn("RoPE options are not supported by the Qwen-Image-2.1 model; ignored")
    if control:
        notices.warn("ControlNets are not supported by the Qwen-Image-2.1 model; the control has no effect")


class QwenPix21Model(comfy.model_base.BaseModel):
    """ComfyUI's BaseModel (flow, CONST) around a qwen_image_core DiT21 (`NativeDiT21`)."""

    def __init__(self, dit: DiT21, dtype: torch.dtype, device=None):
        config = Config21({"disable_unet_model_creation": True})
        config.set_inference_dtype(dtype, None)
        super().__init__(config, comfy.model_base.ModelType.FLOW, device=device)
        self.model_sampling = ModelSampling21()
        self.diffusion_model = NativeDiT21(dit, dtype)
        self.last_workload = Workload21(1024, 1024, compute_bytes=dtype.itemsize)

    def extra_conds(self, **kwargs):
        payload, tokens = kwargs.get(PAYLOAD), kwargs.get("cross_attn")
        if not isinstance(payload, Payload21):
            raise ValueError(
                "this conditioning is not from Qwen-Image-2.1 Encode (a v1 Qwen-Image or other text encoder's): the "
                "Qwen-Image-2.1 MODEL needs the positive / negative outputs of Qwen-Image-2.1 Encode"
            )
        if tokens is None or tuple(tokens.shape) != payload.shape:
            shape = None if tokens is None else list(tokens.shape)
            raise ValueError(
                f"the Qwen-Image-2.1 conditioning's features are {shape}, Qwen-Image-2.1 Encode made "
                f"{list(payload.shape)}: a node changed their length (e.g. ConditioningConcat), which 2.1 cannot "
                "follow; combine prompts with ConditioningCombine or in the prompt text"
            )
        for key in kwargs:
            if key not in SAMPLER_KEYS | IGNORED_KEYS | {PAYLOAD, "cross_attn"}:
                notices.warn(f"conditioning key '{key}' is not used by the Qwen-Image-2.1 model; it has no effect")
        cond = Condition21(tokens, payload.image_slots, payload.ref_latents, payload.txt_mask)
        return {COND_KEY: CONDPrefix21(cond)}

    def extra_conds_shapes(self, **kwargs):
        payload = kwargs.get(PAYLOAD)
        if not isinstance(payload, Payload21):
            return {}
        return {COND_KEY: [1, prefix_tokens(payload.shape[1], payload.image_slots, payload.ref_latents)]}

    def memory_required(self, input_shape, cond_shapes=None):
        """Working memory of one call on `input_shape` rows, from the core's 2.1 activation estimate."""
        cond_shapes = cond_shapes or {}
        prefix = max((s[1] for s in cond_shapes.get(COND_KEY, []) if len(s) > 1), default=512)
        rows, h, w = input_shape[0], input_shape[-2], input_shape[-1]
        wl = Workload21(w * VAE_SCALE, h * VAE_SCALE, rows, False, prefix, (), self.last_workload.compute_bytes)
        self.last_workload = wl
        cfg = self.diffusion_model.config
        return activation_bytes21(wl, cfg.hidden, cfg.mlp_dim)


class Patcher21(QwenPixPatcher):
    """The 2.1 MODEL's patcher: says when a weight patch set holds no key of this model (a LoRA whose keys
    LoraLoaderModelOnly could not map: it only logs them), instead of changing nothing silently."""

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        if not patches:
            notices.warn(
                "a LoRA (or weight patch) with no key for the Qwen-Image-2.1 model was applied and changes nothing: "
                "LoraLoaderModelOnly maps only diffusion_model.<module> / lora_unet_ keys for this model; use "
                "Qwen-Image-2.1 LoRA for transformer.<module> (diffusers) keys, it names any key that fits nothing"
            )
        return super().add_patches(patches, strength_patch, strength_model)


def dit21_model(dit: DiT21, dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    """A MODEL of the 2.1 `dit` computing in `dtype`. One base patcher (and placement) per DiT, kept on it;
    each call returns a clone, so MODELs of one file share the weights on the device."""
    base = getattr(dit, "native_patcher", None)  # lives exactly as long as the weights
    if base is None:
        model = QwenPix21Model(dit, dtype, device=comfy.model_management.unet_offload_device())

        def plan_for(card, budget, max_resident):
            return plan_dit21(dit, budget, card, model.last_workload, 0, max_resident, activation=0)

        blocks = model.diffusion_model.transformer_blocks
        base = placed_patcher(model, model.diffusion_model, blocks, plan_for, patcher_class=Patcher21)
        base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER, prefix_run_wrapper)
        dit.native_patcher = base
    m = base.clone()
    if dtype != base.model.get_dtype():
        m.set_model_compute_dtype(dtype)
    return m


def load_for_run(dit: DiT21, dtype: torch.dtype, latent_shape, condition: Condition21, cfg: bool) -> torch.device:
    """Have ComfyUI's model management load `dit` (its registered patcher: the blocks that fit its budget resident,
    the others streamed) for a 2.1 Sampler run on a latent of `latent_shape` with `condition`'s prefix, CFG as a
    second pass; returns the device it computes on."""
    patcher = dit21_model(dit, dtype)
    prefix = prefix_tokens(condition.txt.shape[1], condition.image_slots, condition.ref_latents)
    rows = 2 if cfg else 1
    need = patcher.model.memory_required([rows, *latent_shape[1:]], {COND_KEY: [[1, prefix]]})
    comfy.model_management.load_models_gpu(
        [patcher], memory_required=need + comfy.model_management.minimum_inference_memory()
    )
    return patcher.load_device


def with_tokens(model: comfy.model_patcher.ModelPatcher, tokens: int) -> comfy.model_patcher.ModelPatcher:
    """A clone of a 2.1 MODEL whose model sampling shifts for a `tokens`-token target."""
    m = model.clone()
    m.add_object_patch("model_sampling", ModelSampling21(tokens))
    return m
