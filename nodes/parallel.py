"""Several devices: the DiT loader's `devices` (the blocks spread over the listed GPUs, `SpreadPlacement`) and the
Qwen-Image Sampler (several devices): one image's tokens split over N devices (Ulysses sequence parallel).

Spread placement (`qwen_image_core.multi_device`): ComfyUI sees the model on its main device, the first listed
(the MODEL's load device): its budget there is ComfyUI's, the bytes ComfyUI counts are those held there, and the
model takes its inputs and returns its output there. The other listed devices are ours: each takes what its free
memory allows (less 1 GiB and one block's activations), unknown to ComfyUI's model management. Out-of-memory
re-planning is not done for a spread model (the error is ComfyUI's).

The work is the core's (`qwen_image_core.parallel`): N worker processes, one per device, each load the MODEL's
DiT file once and stay up between prompts (they are held by the loaded model and end with it or with the
server); this node sends them the conditioning and noise and receives the latents. ComfyUI's cancel button
stops every worker at the same step; a worker's error or death is this node's error, the server stays up.
"""

from __future__ import annotations

import os

import comfy.sample
import comfy.utils
import torch

from ..qwen_image_core.costs import GiB, dit_activation_bytes
from ..qwen_image_core.multi_device import MultiDeviceStreamer, parse_devices
from ..qwen_image_core.multi_device_plan import DeviceBudget, MultiPlan, dit_parts, plan_dit_devices
from ..qwen_image_core.parallel import jobs
from ..qwen_image_core.parallel.group import check_devices
from ..qwen_image_core.parallel.workers import DitFile, Workers
from ..qwen_image_core.pipeline import Conditioning, make_sigmas
from . import checks, host, notices, patcher

DIT = "MODEL"  # as loaders.DIT (not imported from there: the loader imports this module for its `devices`)
CATEGORY = "QwenPix/sampling"
USED_COND_KEYS = {"attention_mask", "reference_latents", "pooled_output"}  # pooled_output: Qwen has none


def _conditioning(name: str, conditioning, text_dim: int) -> Conditioning:
    """The core Conditioning of a one-entry CONDITIONING (text, mask, reference latents); the rest named."""
    checks.check_conditioning(name, conditioning, text_dim)
    if len(conditioning) != 1:
        raise host.InputError(
            f"{name}: {len(conditioning)} conditioning entries; the several-device sampler takes one\n"
            "Fix: connect one Text Encode / Edit Encode output, or use the Qwen-Image Sampler"
        )
    embeds, extra = conditioning[0]
    for key in sorted(set(extra) - USED_COND_KEYS):
        notices.warn(f"{name}: conditioning key '{key}' is not used by the several-device sampler; it has no effect")
    mask = extra.get("attention_mask")
    if mask is not None:
        mask = mask.reshape(embeds.shape[:2]).bool()
        mask = None if bool(mask.all()) else mask
    refs = [host.latent_to_core(r) for r in extra.get("reference_latents") or []]
    return Conditioning(embeds.float().cpu(), mask, refs or None)


# ---------------------------------------------------------------------------------------------------------
# Spread placement: the DiT loader's `devices`
# ---------------------------------------------------------------------------------------------------------


def _signature(plan: MultiPlan) -> tuple:
    return tuple((s.device, s.first, s.plan.num_blocks, s.plan.streamed, s.plan.buffers) for s in plan.stages)


class SpreadPlacement(patcher.Placement):
    """`patcher.Placement` for a DiT spread over `devices` (the first: ComfyUI's load device). `workload()`: the
    last sampling workload (the model's `memory_required` records it) for the activation room of the others."""

    def __init__(self, module, devices, workload, reserve: int = GiB):
        super().__init__(module, module.transformer_blocks, None)
        self.devices, self.workload = [torch.device(d) for d in devices], workload
        self.reserve = reserve  # kept free on each device but the first (whose budget is ComfyUI's)
        self.streamer: MultiDeviceStreamer | None = None
        self.transfers: dict[str, object] = {}  # device name -> its Transfer (made once)
        self._placed = 0

    def _transfer(self, d: torch.device):
        if str(d) not in self.transfers:
            self.transfers[str(d)] = patcher.SEAM.transfer(d)
        return self.transfers[str(d)]

    @property
    def placed_bytes(self) -> int:
        return self._placed

    @property
    def streams(self) -> bool:
        return self.streamer is not None and any(s.plan.streamed for s in self.streamer.stages)

    @property
    def device(self) -> torch.device | None:
        return self.devices[0] if self.streamer is not None else None

    @property
    def held(self) -> int:
        """Bytes held on ComfyUI's device (the first stage's): what ComfyUI's model management counts."""
        return self.streamer.stages[0].plan.device_bytes if self.streamer is not None else 0

    @property
    def can_shrink(self) -> bool:
        return False

    def shrink(self) -> None:
        """No re-planning after an out-of-memory error for a spread model."""

    def plan(self, budget: int | None) -> MultiPlan:
        """The plan for `budget` bytes on the first device and the free memory of the others."""
        wl, cfg = self.workload(), self.module.config
        act = dit_activation_bytes(wl, cfg.hidden, cfg.mlp_dim)
        specs = []
        for j, d in enumerate(self.devices):
            t = self._transfer(d)
            free = t.free_memory()
            free = 1 << 62 if free is None else free + t.allocated  # what this placement holds there counts as free
            room = (free if budget is None else min(free, budget)) if j == 0 else max(0, free - self.reserve - act)
            specs.append(DeviceBudget(str(d), room, patcher.SEAM.card(d)))
        plan = plan_dit_devices(self.module, specs, wl, reserve=0, activation_bytes=0)
        if plan.stages[0].device != str(self.devices[0]):
            raise RuntimeError(f"QwenPix: {self.devices[0]} (ComfyUI's device for this model) cannot hold its first "
                               f"blocks: {plan.explain()}")  # fmt: skip
        return plan

    def place(self, device, budget, max_resident=None) -> int:
        if device is None or torch.device(device).type == "cpu":
            return 0
        if torch.device(device) != self.devices[0]:
            raise RuntimeError(f"QwenPix: the model is spread over {', '.join(map(str, self.devices))} and must be "
                               f"loaded on {self.devices[0]}, not {device}")  # fmt: skip
        plan = self.plan(None if budget is None else int(budget))
        if self.streamer is not None and _signature(self.streamer.plan) == _signature(plan):
            return self.held
        self.release()
        head, blocks, tail = dit_parts(self.module)
        transfers = [self.transfers[s.device] for s in plan.stages]
        self.streamer = MultiDeviceStreamer(self.module, head, blocks, tail, plan, transfers).attach()
        self._guard = self.module.register_forward_pre_hook(_no_control, with_kwargs=True)
        self._placed += sum(s.stats.load_bytes for s in self.streamer.streamers)
        self.last_plan = plan.explain()
        return self.held

    def release(self, host: bool = False) -> None:
        if self.streamer is not None:
            self._guard.remove()
            self.streamer.detach()
            self.streamer = None
            for t in self.transfers.values():
                t.empty_cache()


def _no_control(module, args, kwargs) -> None:
    """ControlNet residuals are made on ComfyUI's device and added after each block, where a spread model's
    streams may be on another GPU: refused clearly rather than failing deep inside (or silently left out)."""
    if kwargs.get("control"):
        raise host.InputError(
            "model: ControlNet residuals are not supported on a model spread over several devices (the DiT "
            "loader's devices)\nFix: clear devices on Load Qwen-Image Diffusion Model to run this ControlNet"
        )


def spread(native, text: str) -> str | None:
    """Spread the MODEL `native` (a fresh loader output) over the devices listed in `text` ("" or one device: the
    usual one-device placement); returns the plan's text for the node, or None. A clear error for a device
    that does not exist. The choice belongs to the DiT (shared by every MODEL of it)."""
    base = native.model
    single = getattr(base, "qwenpix_single_placement", None) or base.qwenpix_placement
    base.qwenpix_single_placement = single
    names = [d for d in str(text).split(",") if d.strip()]
    try:
        devices = parse_devices(text) if names else []
        if any(d.type != "cuda" for d in devices):
            raise ValueError("list CUDA devices only (e.g. cuda:0,cuda:1)")
    except ValueError as e:
        raise host.InputError(f"devices '{text}': {e}\nFix: list the GPUs to spread the model over, e.g. "
                              "cuda:0,cuda:1, or leave it empty for ComfyUI's device") from None  # fmt: skip
    current = base.qwenpix_placement
    want = devices if len(devices) > 1 else None
    have = current.devices if isinstance(current, SpreadPlacement) else None
    if want != have:
        current.release(host=True)
        base.qwenpix_placement = single if want is None else SpreadPlacement(
            base.diffusion_model, want, lambda: base.last_workload)  # fmt: skip
    if devices:
        native.load_device = devices[0]
    if want is None:
        return None
    return base.qwenpix_placement.plan(None).explain()


# ---------------------------------------------------------------------------------------------------------
# Sequence parallel
# ---------------------------------------------------------------------------------------------------------


def _devices(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in str(text).split(",") if d.strip())
    try:
        check_devices(devices)
        for d in devices:
            torch.device(d)
    except (ValueError, RuntimeError) as e:
        raise host.InputError(f"devices '{text}': {e}\nFix: list one device per rank, e.g. cuda:0,cuda:1") from None
    return devices


def _workers(core, devices: tuple[str, ...], budget: int | None) -> Workers:
    """The workers of this DiT on these devices, started on first use and kept on the model between prompts."""
    gpus = all(torch.device(d).type == "cuda" for d in devices)  # mapped: each worker copies it to its GPU
    dit = DitFile(str(core.path), (("zero_cond_t", core.zero_cond_t), ("mmap", gpus)), budget)
    held = getattr(core, "parallel_workers", None)
    if held is not None and held.devices == devices and held.dit == dit:
        return held
    if held is not None:
        held.stop()
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // len(devices))  # CPU ranks share the cores
    core.parallel_workers = Workers(dit, devices, threads=threads)
    return core.parallel_workers


def _check_model(dit, core) -> None:
    if not getattr(core, "path", None):
        raise host.InputError(
            "dit: this MODEL has no QwenPix DiT file to give the workers\n"
            "Fix: load it with Load Qwen-Image Diffusion Model"
        )
    if dit.patches:
        raise host.InputError(
            "dit: LoRAs / weight patches are not applied by the several-device sampler (its workers load the file)\n"
            "Fix: use the Qwen-Image Sampler for LoRA'd models"
        )
    if dit.object_patches.get("diffusion_model.positions", "official") != "official":
        raise host.InputError(
            "dit: loaded with positions 'ComfyUI native'; the several-device sampler uses the official positions\n"
            "Fix: set positions to 'official (diffusers)' on the DiT loader"
        )
    options = dit.model_options.get("transformer_options", {})
    if options.get("patches") or options.get("patches_replace") or options.get("wrappers"):
        notices.warn("model patches (block patches, wrappers) are not used by the several-device sampler")
    if dit.model_options.get("sampler_post_cfg_function") or dit.model_options.get("sampler_cfg_function"):
        notices.warn("CFG functions patched into the model are not used by the several-device sampler")


class QwenPixParallelSampler:
    DISPLAY_NAME = "Qwen-Image Sampler (several devices)"
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled latent (native layout).",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Samples one image on several devices at once: the image tokens are split over them (Ulysses sequence "
        "parallel), each device holding the whole DiT. Euler with true CFG (diffusers' per-token rescale) on "
        "the ModelSamplingAuraFlow shift schedule, as the core pipeline."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "A Qwen-Image MODEL from Load Qwen-Image Diffusion Model (no LoRAs)."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw / the edit instruction (one entry)."}),
                "negative": ("CONDITIONING", {"tooltip": "Used when cfg is above 1 (one entry)."}),
                "latent_image": ("LATENT", {"tooltip": "Sets the size and batch (text-to-image: full denoise)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
                "cfg": (
                    "FLOAT",
                    {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "True-CFG scale (1: off)."},
                ),
                "shift": (
                    "FLOAT",
                    {"default": 3.1, "min": 0.01, "max": 100.0, "step": 0.01, "tooltip": "Schedule shift (3.1)."},
                ),
                "devices": (
                    "STRING",
                    {
                        "default": "cuda:0,cuda:1",
                        "tooltip": "One device per worker, comma-separated (all CUDA: NCCL; cpu,cpu: gloo, for tests).",
                    },
                ),
            },
            "optional": {
                "dit_gb_per_device": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "GB of each device the DiT may take; the blocks that do not fit stream from "
                        "host memory every step. 0: the whole DiT on each device.",
                    },
                ),
            },
        }

    def sample(self, dit, positive, negative, latent_image, seed, steps, cfg, shift, devices, dit_gb_per_device=0.0):
        cfg = checks.finite_number("cfg", cfg, "set cfg from 0 to 100 (4 is the official default)")
        shift = checks.finite_number("shift", shift, "set shift above 0 (3.1 as the official workflows)")
        devices = _devices(devices)
        inner = host.qwen_diffusion_model(dit, "dit")
        core = getattr(inner, "core", inner)
        _check_model(dit, core)
        if core.config.num_heads % len(devices):
            raise host.InputError(
                f"devices: {len(devices)} devices; this DiT's {core.config.num_heads} attention heads must split "
                f"evenly over them\nFix: use a number of devices that divides {core.config.num_heads} "
                "(the real model's 24: 2, 3, 4, 6 or 8)"
            )
        text_dim = core.config.text_dim
        cond = _conditioning("positive", positive, text_dim)
        uncond = _conditioning("negative", negative, text_dim) if cfg > 1.0 else None
        if not isinstance(latent_image, dict) or not torch.is_tensor(latent_image.get("samples")):
            raise host.InputError("latent_image: not a LATENT\nFix: connect Empty Latent (Qwen-Image)")
        if "noise_mask" in latent_image:
            notices.warn("latent_image: the noise mask is not used by the several-device sampler (full denoise)")
        latent = comfy.sample.fix_empty_latent_channels(dit, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index")).float()
        noise = noise[:, :, 0] if noise.ndim == 5 else noise  # [B, 16, h, w], unit variance in the model's space
        dtype = torch.float32 if all(torch.device(d).type == "cpu" for d in devices) else torch.bfloat16
        cond.embeds = cond.embeds.to(dtype)
        if uncond is not None:
            uncond.embeds = uncond.embeds.to(dtype)
        h, w = noise.shape[-2:]
        sigmas = make_sigmas(float(shift), steps, h * 8, w * 8)
        bar = comfy.utils.ProgressBar(steps)
        gb = checks.finite_number("dit_gb_per_device", dit_gb_per_device, "set it to 0 or the GB per device")
        latents = _workers(core, devices, int(gb * 1e9) if gb > 0 else None).run(
            jobs.sample, noise, cond, uncond, sigmas=sigmas, cfg_scale=cfg,
            check_interrupt=host.check_interrupt, on_progress=lambda i, n: bar.update_absolute(i, n),
        )  # fmt: skip
        bad = checks.describe_non_finite(latents)
        if bad:
            raise host.InputError(f"the latents hold NaN/inf: {bad}\nFix: compute in bf16 or fp32")
        out = dict(latent_image)
        out["samples"] = host.latent_to_comfy(latents).reshape(latent.shape)
        return (out,)


NODES = {"QwenPixParallelSampler": QwenPixParallelSampler}
