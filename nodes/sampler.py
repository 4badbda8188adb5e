"""The sampler node: ComfyUI's own samplers and schedulers on a Qwen-Image MODEL, plus what the official
pipeline adds: its resolution-dependent ("dynamic") schedule, the Lightning schedule, explicit sigma lists,
diffusers' per-token CFG rescale, and a shift that is ModelSamplingAuraFlow's.

Everything else is ComfyUI's machinery (`comfy.samplers.CFGGuider`, `sampler_object`, `calculate_sigmas`,
`latent_preview`), so the conditioning is honoured as KSampler honours it: ConditioningCombine entries,
ConditioningSetTimestepRange, areas and masks, ControlNets, a latent's noise mask (SetLatentNoiseMask), any
model patch upstream. On a QwenPix MODEL cond and uncond run as one batched pass even when the prompts
differ in length, and the DiT is placed by the VRAM planner. Refused before sampling, naming the input: a
ControlNet of another model in the conditioning (Flux, SD/SDXL, T2I adapters, Control-LoRAs), a noise mask whose
batch is neither 1 nor the latent's; a noise mask of another aspect ratio is stretched (as KSampler) with a warning.
"""

from __future__ import annotations

import comfy.ldm.qwen_image.controlnet
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_extras.nodes_cfg import CFGNorm
from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

from ..qwen_image_core import sampling
from ..qwen_image_core.offload_plan import DiTWorkload, sampling_bytes
from . import checks, host, inputs, notices
from .controlnet import ComfyControlNet
from .loaders import DIT

CATEGORY = "QwenPix/sampling"
# our schedules (name -> kind), then every ComfyUI scheduler under its own name
OWN_SCHEDULES = {
    "shift (ComfyUI workflows)": "simple",  # ModelSamplingAuraFlow(shift) + the simple scheduler
    "dynamic (diffusers official)": "dynamic",
    "lightning (4/8-step LoRAs)": "lightning",
}
SCHEDULES = {**OWN_SCHEDULES, **{s: s for s in comfy.samplers.KSampler.SCHEDULERS}}
RESCALES = {"norm (diffusers)": "norm", "CFGNorm (ComfyUI)": "cfgnorm", "none": None}
# where Qwen-Image control models live: ComfyUI's InstantX one and the pack's own (this package's modules)
QWEN_CONTROL_MODULES = (comfy.ldm.qwen_image.controlnet.__name__, ComfyControlNet.__module__.rsplit(".", 2)[0] + ".")
LATENT_KEYS = {"samples", "noise_mask", "batch_index"}  # what KSampler reads of a LATENT, as this node does
SIGMAS_TOOLTIP = "Optional: an explicit schedule (e.g. from BasicScheduler or a distilled model's list)."


class QwenPixSampler:
    DISPLAY_NAME = "Qwen-Image Sampler"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled latent (native layout: VAE Decode works on it too).",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Samples a Qwen-Image MODEL with ComfyUI's samplers and schedulers, the official dynamic schedule or "
        "an explicit sigma list; true CFG with cond and uncond in one pass on QwenPix models."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "A Qwen-Image MODEL (with any LoRAs and model patches)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw / the edit instruction."}),
                "negative": ("CONDITIONING", {"tooltip": "Used when cfg is not 1 (the official negative is ' ')."}),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "Empty latent (sets the size), or an encoded image for img2img (a noise mask "
                        "from SetLatentNoiseMask limits the change to the masked area)."
                    },
                ),  # fmt: skip
                "seed": inputs.seed(),
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Sampling steps (official: 50; ComfyUI workflows: 20; Lightning: 4 or 8).",
                    },
                ),
                "cfg": inputs.true_cfg("True-CFG scale; exactly 1 skips the negative pass (Lightning LoRAs use 1)."),
                "sampler_name": (
                    comfy.samplers.KSampler.SAMPLERS,
                    {"tooltip": "Any ComfyUI sampler (euler is what the reference pipelines use)."},
                ),
                "schedule": (
                    list(SCHEDULES),
                    {
                        "tooltip": "shift: ModelSamplingAuraFlow(shift) + simple, as the official workflows. "
                        "dynamic: diffusers' resolution-dependent shift (ignores shift). lightning: plain shift 3 "
                        "(ignores shift). Every other entry is that ComfyUI scheduler on the shifted model."
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 3.1,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "ModelSamplingAuraFlow shift for ComfyUI schedulers (official workflows: 3.1; "
                        "edit: 3). 0 keeps the model's own sampling (e.g. set upstream by ModelSamplingAuraFlow).",
                    },
                ),
                "cfg_rescale": (
                    list(RESCALES),
                    {
                        "tooltip": "How guided predictions are rescaled: diffusers' per-token norm, ComfyUI's "
                        "CFGNorm (with rescale_strength), or none. The default is norm because the official "
                        "(diffusers) pipeline rescales so; ComfyUI's t2i workflows use none, edit ones CFGNorm."
                    },
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Below 1 keeps part of the input latent (img2img).",
                    },
                ),
            },
            "optional": {
                "rescale_strength": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "CFGNorm's strength."},
                ),
                "sigmas": ("SIGMAS", {"tooltip": SIGMAS_TOOLTIP + " Replaces steps, schedule and denoise."}),
            },
        }

    def sample(self, dit, positive, negative, latent_image, seed, steps, cfg, sampler_name, schedule, shift,
               cfg_rescale, denoise, rescale_strength=1.0, sigmas=None):  # fmt: skip
        cfg = checks.finite_number("cfg", cfg, "set cfg from 0 to 100 (4 is the official default; 1 for Lightning)")
        denoise = checks.finite_number("denoise", denoise, "set denoise from 0 to 1 (1 for text-to-image)")
        shift = checks.finite_number("shift", shift, "set shift from 0 to 100 (official: 3.1; 0 keeps the model's)")
        strength = checks.finite_number("rescale_strength", rescale_strength, "set rescale_strength from 0 to 100")
        inner = host.qwen_diffusion_model(dit, "dit")
        text_dim = qwen_text_dim(dit)
        checks.check_conditioning("positive", positive, text_dim)
        checks.check_conditioning("negative", negative, text_dim)
        if not isinstance(latent_image, dict) or not torch.is_tensor(latent_image.get("samples")):
            raise host.InputError("latent_image: not a LATENT\nFix: connect Empty Latent (Qwen-Image) or VAE Encode")
        for key in sorted(set(latent_image) - LATENT_KEYS):
            notices.warn(f"latent_image key '{key}' is not used by the Qwen-Image Sampler; it has no effect")
        latent = comfy.sample.fix_empty_latent_channels(dit, latent_image["samples"])
        if latent.shape[1] != 16:
            raise host.InputError(
                f"latent_image: a {latent.shape[1]}-channel latent {list(latent.shape)}; Qwen-Image takes 16\n"
                "Fix: use a latent from Empty Latent (Qwen-Image), EmptySD3LatentImage or a Qwen-Image VAE Encode"
            )
        check_memory(dit, inner, latent, positive)
        check_controls("positive", positive)
        check_controls("negative", negative)
        check_noise_mask(latent_image, latent)

        model = with_shift(dit, shift, SCHEDULES[schedule], sigmas is not None)
        schedule_sigmas = make_sigmas(model, SCHEDULES[schedule], steps, denoise, latent, sigmas, sampler_name)
        if len(schedule_sigmas) < 2:
            return (latent_image,)
        model = with_rescale(model, RESCALES[cfg_rescale], strength)

        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        total = len(schedule_sigmas) - 1
        guard = FiniteGuard(latent_preview.prepare_callback(model, total), dit, latent_image)
        samples = guider.sample(
            noise, latent, comfy.samplers.sampler_object(sampler_name), schedule_sigmas,
            denoise_mask=latent_image.get("noise_mask"), callback=guard,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )  # fmt: skip
        guard.check(samples, total - 1, total)
        out = dict(latent_image)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return (out,)


def qwen_text_dim(model) -> int:
    """The prompt-embedding width a Qwen-Image MODEL takes (3584 for Qwen2.5-VL-7B)."""
    inner = model.model.diffusion_model
    config = getattr(inner, "config", None)
    if config is not None:
        return config.text_dim
    return int(inner.txt_in.in_features)  # (a packed layer's weight holds bytes, not [out, in])


def with_shift(model, shift: float, kind: str, explicit_sigmas: bool):
    """The MODEL with ModelSamplingAuraFlow(shift) for ComfyUI's schedulers; shift 0 keeps its own sampling."""
    if kind in ("dynamic", "lightning") or explicit_sigmas or shift == 0:
        return model
    if "model_sampling" in model.object_patches:
        notices.warn(
            f"the model's sampling (set upstream, e.g. by ModelSamplingAuraFlow) is replaced by shift {shift:g}; "
            "set shift to 0 on the Qwen-Image Sampler to keep it"
        )
    return ModelSamplingAuraFlow().patch_aura(model, shift)[0]


def make_sigmas(model, kind: str, steps: int, denoise: float, latent: torch.Tensor, explicit, sampler: str):
    """The schedule: explicit sigmas, or KSampler's own computation (`comfy.samplers.KSampler`: its denoise
    rule, and steps + 1 with the penultimate sigma dropped for the samplers that need it) of a ComfyUI
    scheduler on the model's sampling, or of the official dynamic / Lightning schedule."""
    if explicit is not None:
        notices.warn(f"using the {len(explicit) - 1}-step sigmas connected; steps, schedule, shift, denoise unused")
        return torch.as_tensor(explicit, dtype=torch.float32).flatten().cpu()
    device = model.load_device
    if kind in comfy.samplers.KSampler.SCHEDULERS:
        return comfy.samplers.KSampler(model, steps, device, sampler, kind, denoise, model.model_options).sigmas.cpu()
    h, w = latent.shape[-2], latent.shape[-1]
    schedule = OwnSchedule(kind, sampling.image_seq_len(h, w), model, steps, device, sampler, denoise)
    return schedule.sigmas.cpu()


class OwnSchedule(comfy.samplers.KSampler):
    """KSampler's sigma bookkeeping (denoise, dropped penultimate sigma) around the official dynamic schedule
    (diffusers' resolution-dependent shift) or the Lightning one."""

    def __init__(self, kind: str, seq_len: int, *args):
        self.kind, self.seq_len = kind, seq_len
        super().__init__(*args)

    def calculate_sigmas(self, steps):
        extra = self.sampler in self.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        n = steps + 1 if extra else steps
        sigmas = sampling.sigmas_diffusers(n, self.seq_len) if self.kind == "dynamic" else sampling.sigmas_lightning(n)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if extra else sigmas


def with_rescale(model, kind: str | None, strength: float):
    """The MODEL with a post-CFG rescale: ComfyUI's own CFGNorm, or diffusers' per-token norm."""
    if kind == "cfgnorm":
        return CFGNorm.execute(model, strength).result[0]
    if kind == "norm":
        model = model.clone()
        model.set_model_sampler_post_cfg_function(token_norm_post_cfg)
    return model


def token_norm_post_cfg(args: dict) -> torch.Tensor:
    """diffusers' Qwen CFG rescale as a ComfyUI post-CFG function: the guided velocity of each 2x2 token is
    scaled to the norm of the conditional velocity (the two velocities are (x - x0) / sigma)."""
    x, guided, cond = args["input"], args["denoised"], args["cond_denoised"]
    frames = x.ndim == 5
    squeeze = (lambda t: t[:, :, 0]) if frames else (lambda t: t)
    sigma = args["sigma"].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    v = sampling.token_norm_rescale(squeeze((x - guided) / sigma), squeeze((x - cond) / sigma))
    return x - sigma * (v.unsqueeze(2) if frames else v)


def check_controls(name: str, conditioning) -> None:
    """Refuse ControlNets of other models in the conditioning (ControlNetApply* outputs): only Qwen-Image's
    (InstantX, through ComfyUI's loader or ours) can feed this model's blocks. Qwen-Image ones are honoured by
    ComfyUI's guider as in KSampler: residuals computed per step, added after each block."""
    for _, extra in conditioning:
        control = extra.get("control")
        while control is not None:
            model = getattr(control, "control_model", None)
            if model is None or not type(model).__module__.startswith(QWEN_CONTROL_MODULES):
                what = type(model if model is not None else control).__name__
                raise host.InputError(
                    f"{name}: a ControlNet applied to it ({what}) is not a Qwen-Image ControlNet; its residuals "
                    "cannot feed a Qwen-Image model\nFix: load an InstantX Qwen-Image ControlNet (Union or "
                    "Inpainting) with Load ControlNet Model or Load Qwen-Image ControlNet; DiffSynth patches go "
                    "through ModelPatchLoader + QwenImageDiffsynthControlnet"
                )
            control = control.previous_controlnet


def check_noise_mask(latent_image: dict, latent: torch.Tensor) -> None:
    """A latent noise mask (SetLatentNoiseMask) for another batch is an error; one of another size is stretched
    to the latent as ComfyUI does, with a warning when its aspect ratio differs from the latent's."""
    mask = latent_image.get("noise_mask")
    if mask is None:
        return
    if not torch.is_tensor(mask) or mask.ndim < 2:
        raise host.InputError(f"latent_image: its noise_mask is not a mask tensor ({checks.describe_value(mask)})")
    batch = mask.reshape(-1, *mask.shape[-2:]).shape[0]
    if batch not in (1, latent.shape[0]):
        raise host.InputError(
            f"latent_image: its noise mask has a batch of {batch}; the latent has {latent.shape[0]}\n"
            "Fix: give SetLatentNoiseMask one mask, or one per latent"
        )
    (mh, mw), (lh, lw) = mask.shape[-2:], latent.shape[-2:]
    if abs(mw / mh - lw / lh) > max(1 / lh, 1 / lw):
        notices.warn(f"the noise mask is {mw}x{mh}, the latent {lw * 8}x{lh * 8} pixels: it is stretched to fit")


def check_memory(model, inner, latent: torch.Tensor, positive) -> None:
    """Refuse, before allocating anything, a job whose activations cannot fit the device at all."""
    refs = []
    for _, extra in positive:
        refs = [(r.shape[-1] * 8, r.shape[-2] * 8) for r in extra.get("reference_latents") or []] or refs
    dtype = model.model_dtype() or torch.float32
    text = max(int(c.shape[1]) for c, _ in positive)
    wl = DiTWorkload(latent.shape[-1] * 8, latent.shape[-2] * 8, latent.shape[0], True, text, tuple(refs),
                     compute_bytes=dtype.itemsize, fp16=dtype == torch.float16)  # fmt: skip
    hidden = inner.img_in.out_features
    mlp = inner.transformer_blocks[0].img_mlp.net[0].proj.out_features if len(inner.transformer_blocks) else hidden
    need = sampling_bytes(wl, hidden, mlp)
    device = model.load_device
    room = host.memory_room(device)
    if need > room:
        raise host.InputError(
            f"latent_image: batch {wl.batch} at {wl.width}x{wl.height} pixels ({wl.describe()}) needs about "
            f"{need / 2**30:.1f} GiB for sampling, but {device.type} has {room / 2**30:.1f} GiB\n"
            "Fix: lower batch_size or the image size on the latent node"
        )


class FiniteGuard:
    """ComfyUI's preview/progress callback, first stopping sampling with the likeliest cause once the latents
    stop being finite numbers. The check never waits for the device: each step's verdict is computed there
    and copied back asynchronously; it is read at a later step when it has arrived (at most one step late on
    a GPU, at once on the CPU) and at the end, where sampling waits for the device anyway."""

    def __init__(self, inner, model, latent_image: dict):
        self.inner, self.model, self.latent = inner, model, latent_image
        self.pending: list[tuple[int, int, torch.Tensor, object]] = []  # (step, steps, host flag, copy event)

    def __call__(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        self.pending.append((step, total_steps, *_host_flag(torch.isfinite(x).all())))
        self._read(wait=False)
        self.inner(step, x0, x, total_steps)

    def check(self, x: torch.Tensor, step: int, steps: int) -> None:
        """After sampling: every step's verdict, then the final latents."""
        self.pending.append((step, steps, *_host_flag(torch.isfinite(x).all())))
        self._read(wait=True)

    def _read(self, wait: bool) -> None:
        while self.pending:
            step, steps, flag, event = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self.pending.pop(0)
            if not bool(flag):
                self.pending.clear()
                self._fail(step, steps)

    def _fail(self, step: int, steps: int) -> None:
        dtype = self.model.model_dtype() or torch.float32
        choice = self.model.get_attachment("qwenpix_compute") or "auto"
        inputs = {"latent_image": self.latent.get("samples")}
        raise host.InputError(checks.non_finite_message(step, steps, dtype, choice, ModelSummary(self.model), inputs))


def _host_flag(flag: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A device bool's copy in (pinned) host memory and the event after which it is valid (None on the CPU)."""
    if flag.device.type != "cuda":
        return flag, None
    host_copy = torch.empty((), dtype=torch.bool, pin_memory=True)
    host_copy.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host_copy, event


class ModelSummary:
    """What the NaN diagnosis reads of a MODEL: the core model, its name, its LoRAs as (name, strength)."""

    def __init__(self, model):
        inner = model.model.diffusion_model
        self.model = getattr(inner, "core", inner)
        self.name = model.get_attachment("qwenpix_name") or "the diffusion model"
        self.loras = list(model.get_attachment("qwenpix_loras") or ())
        if model.patches and not self.loras:
            self.loras = [(f"{len(model.patches)} patched weights", 1.0)]


NODES = {"QwenPixSampler": QwenPixSampler}
