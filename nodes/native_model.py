"""The QwenPix DiT as ComfyUI's native Qwen-Image model: what KSampler, SamplerCustomAdvanced, model patches,
LoRA loaders and caches drive when they are given our MODEL.

`QwenPixModel` is ComfyUI's own `comfy.model_base.QwenImage` (latent format, model sampling, conditioning
types, memory estimate) with `qwen_image_core`'s MMDiT as its `diffusion_model`. `NativeDiT` gives that
MMDiT ComfyUI's calling convention: it holds the MMDiT's own modules (so the state-dict keys, and with them
every LoRA key map, are the native ones), runs the DIFFUSION_MODEL wrappers (EasyCache), and turns
`transformer_options` block patches and ControlNet residuals into the core's `block_hook`. What it cannot
honour is reported with `notices.warn`, never dropped silently.
"""

from __future__ import annotations

import dataclasses

import comfy.conds
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
import torch
from torch import nn

from ..qwen_image_core import compiled, matmul, modulation
from ..qwen_image_core.mmdit import MMDiT
from ..qwen_image_core.offload_plan import DiTWorkload, plan_dit, sampling_bytes
from . import host, notices, run_modulation
from .conds import CONDPaddedTokens, CONDTextLengths
from .patcher import placed_patcher

POSITIONS = {"official (diffusers)": "official", "ComfyUI native": "comfyui"}
# reference_latents_method (FluxKontextMultiReferenceLatentMethod) -> (core ref_layout, zero_cond_t)
REF_METHODS = {
    "index": ("index", None),
    "offset": ("offset", None),
    "uxo": ("offset", None),  # ComfyUI's Qwen model treats every method but "index" as "offset"
    "index_timestep_zero": ("index", True),
}
# conditioning keys ComfyUI's sampling consumes itself (areas, masks, strengths, timestep ranges, control...)
SAMPLER_KEYS = {
    "area", "strength", "mask", "mask_strength", "set_area_to_bounds", "start_percent", "end_percent",
    "timestep_start", "timestep_end", "clip_start_percent", "clip_end_percent", "control", "control_apply_to_uncond",
    "gligen", "hooks", "default", "uuid", "model_conds", "device", "noise", "width", "height", "prompt_type",
    "latent_image", "denoise_mask", "seed", "latent_shapes",
}  # fmt: skip
MODEL_KEYS = {"cross_attn", "attention_mask", "reference_latents", "reference_latents_method"}  # ours
SILENT_KEYS = {"pooled_output"}  # set by every text encoder; Qwen-Image has no pooled input (native ignores it)
HONOURED_PATCHES = {"double_block"}


class NativeDiT(nn.Module):
    """ComfyUI's `diffusion_model` interface over an MMDiT: same modules, same keys, ComfyUI's arguments.

    x [B, 16, 1, H, W] (or [B, 16, H, W]) normalised latent, timestep [B] sigma, context [B, L, D];
    returns the flow velocity in x's layout, as ComfyUI's own QwenImageTransformer2DModel does.
    """

    def __init__(self, dit: MMDiT, dtype: torch.dtype, positions: str = "official"):
        super().__init__()
        for name, child in dit.named_children():  # shared, not copied: the MMDiT and this module are one model
            self.add_module(name, child)
        self.config, self.dtype, self.positions = dit.config, dtype, positions
        self.matmul = "off"  # matmul.MODES: native quantised products (an object patch per MODEL, like positions)
        self.compile = "off"  # compiled.BACKENDS: torch.compile of each block's forward (an object patch too)
        self.core_forward = dit.forward  # a bound method (not a submodule): computes with the same modules

    @property
    def core(self) -> MMDiT:
        """The qwen_image_core model these modules belong to."""
        return self.core_forward.__self__

    def forward(self, x, timestep, context, attention_mask=None, guidance=None, ref_latents=None,
                transformer_options=None, **kwargs):  # fmt: skip
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options
        )
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, attention_mask, guidance, ref_latents, transformer_options, **kwargs
        )

    def _forward(self, x, timestep, context, attention_mask=None, guidance=None, ref_latents=None,
                 transformer_options=None, control=None, ref_latents_method=None, txt_lengths=None,
                 **kwargs):  # fmt: skip
        if kwargs:
            notices.warn(f"the Qwen-Image model was given inputs it does not use: {', '.join(sorted(kwargs))}")
        if guidance is not None:
            notices.warn("Qwen-Image has no guidance input: the conditioning's 'guidance' (FluxGuidance) is ignored")
        layout, zero_cond_t = REF_METHODS.get(ref_latents_method or "index", (None, None))
        if layout is None:
            notices.warn(f"reference_latents_method '{ref_latents_method}' is unknown; using 'index'")
            layout = "index"
        check_inputs(x, context, self.config)
        frames = x.ndim == 5
        img = x[:, :, 0] if frames else x
        refs = [r[:, :, 0] if r.ndim == 5 else r for r in ref_latents or []]
        mask = None if attention_mask is None or txt_lengths is not None else attention_mask.to(img.device) != 0
        options = transformer_options or {}
        hook = block_hook(x, options, control, len(self.transformer_blocks))
        step_mod = run_modulation.step_modulation(options, self.core, timestep, img, refs, zero_cond_t)  # or None
        with matmul.using(self.core, self.matmul), compiled.using(self.transformer_blocks, self.compile):
            out = self.core_forward(
                img, timestep, context, mask, refs or None, zero_cond_t,
                positions=self.positions, ref_layout=layout, block_hook=hook, attention_fn=host_attention(options),
                txt_lengths=txt_lengths, step_mod=step_mod,
            )  # fmt: skip
        return out.unsqueeze(2) if frames else out


def check_inputs(x: torch.Tensor, context: torch.Tensor, config) -> None:
    """Clear errors for a latent or conditioning of another model family (else a shape error deep inside)."""
    channels = config.in_channels // config.patch_size**2
    if x.shape[1] != channels or x.ndim not in (4, 5) or (x.ndim == 5 and x.shape[2] != 1):
        raise ValueError(
            f"the latent is {list(x.shape)}; Qwen-Image samples one-frame {channels}-channel latents "
            "[B, 16, 1, H, W]: use Empty Latent (Qwen-Image), EmptySD3LatentImage or a Qwen-Image VAE Encode"
        )
    if context is None or context.ndim != 3 or context.shape[-1] != config.text_dim:
        shape = None if context is None else list(context.shape)
        raise ValueError(
            f"the conditioning is {shape}; this Qwen-Image model takes [B, tokens, {config.text_dim}]: encode the "
            "prompt with the text encoder that belongs to it (Qwen2.5-VL-7B for Qwen-Image)"
        )


def host_attention(options: dict):
    """Attention through ComfyUI's own dispatch (its --use-*-attention flags, attention overrides in the
    transformer options, its CPU kernels): the core's `attention` signature on [B, H, L, D] tensors."""
    dispatch = comfy.ldm.modules.attention.optimized_attention_masked

    def attend(q, k, v, key_mask=None, causal=False):
        mask = None
        if key_mask is not None:  # additive, broadcast over heads and (for SDPA) over queries
            mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
            mask = mask[:, None, None, :]
            if dispatch is not comfy.ldm.modules.attention.attention_pytorch:  # the others want every query row
                mask = mask.expand(-1, -1, q.shape[2], -1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return dispatch(q, k, v, q.shape[1], mask, skip_reshape=True, skip_output_reshape=True,
                        transformer_options=options)  # fmt: skip

    return attend


def block_hook(x: torch.Tensor, options: dict, control: dict | None, total: int):
    """The core `block_hook`: checks for interruption, runs ComfyUI's block patches, adds ControlNet residuals."""
    check_options(options)
    replace = options.get("patches_replace", {}).get("dit", {})
    after = options.get("patches", {}).get("double_block", [])
    residuals = (control or {}).get("input") or []
    if not (replace or after or residuals):

        def plain(i, run, img, txt, temb, pe):
            host.check_interrupt()
            return run(img, txt, temb, pe)

        return plain
    options.update(total_blocks=total, block_type="double")

    def hook(i, run, img, txt, temb, pe):
        host.check_interrupt()
        options["block_index"] = i
        if ("double_block", i) in replace:

            def original_block(args):
                img_, txt_ = run(args["img"], args["txt"], args["vec"], args["pe"])
                return {"img": img_, "txt": txt_}

            args = {"img": img, "txt": txt, "vec": temb, "pe": pe, "transformer_options": options}
            out = replace[("double_block", i)](args, {"original_block": original_block})
            img, txt = out["img"], out["txt"]
        else:
            img, txt = run(img, txt, temb, pe)
        for patch in after:
            out = patch({"img": img, "txt": txt, "x": x, "block_index": i, "transformer_options": options})
            img, txt = out["img"], out["txt"]
        add = residuals[i] if i < len(residuals) else None
        if add is not None:
            img = img.clone()
            img[:, : add.shape[1]] += add.to(img.dtype)
        return img, txt

    return hook


def check_options(options: dict) -> None:
    """Warn about transformer_options entries that ask for something this model does not do."""
    for kind in options.get("patches", {}):
        if kind not in HONOURED_PATCHES and options["patches"][kind]:
            notices.warn(f"model patch '{kind}' is not supported by the Qwen-Image model and has no effect")
    for group, patches in options.get("patches_replace", {}).items():
        for key in patches:
            if group != "dit" or not (isinstance(key, tuple) and key[0] == "double_block"):
                notices.warn(f"block replacement {group}/{key} does not exist in the Qwen-Image model; ignored")
    if "rope_options" in options:
        notices.warn("RoPE options (set_model_rope_options) are not supported by the Qwen-Image model; ignored")


class QwenPixModel(comfy.model_base.QwenImage):
    """ComfyUI's Qwen-Image model class around a qwen_image_core MMDiT (`NativeDiT`)."""

    def __init__(self, dit: MMDiT, dtype: torch.dtype, positions: str = "official", device=None):
        config = comfy.supported_models.QwenImage({"image_model": "qwen_image", "disable_unet_model_creation": True})
        config.set_inference_dtype(dtype, None)
        super().__init__(config, device=device)
        self.diffusion_model = NativeDiT(dit, dtype, positions)
        self.last_workload = DiTWorkload(compute_bytes=dtype.itemsize, fp16=dtype == torch.float16)

    def extra_conds(self, **kwargs):
        if "qwenpix21" in kwargs:  # Qwen-Image-2.1 Encode's payload (nodes/qwen21_model.py)
            raise ValueError(
                "this conditioning is from Qwen-Image-2.1 Encode, for the Qwen-Image-2.1 MODEL (the MODEL output of "
                "Load Qwen-Image-2.1 Diffusion Model); a v1 Qwen-Image model takes Qwen-Image Text Encode / Edit Encode"
            )
        for key in kwargs:
            if key not in SAMPLER_KEYS | MODEL_KEYS | SILENT_KEYS:
                notices.warn(f"conditioning key '{key}' is not used by the Qwen-Image model; it has no effect")
        out = super().extra_conds(**kwargs)
        tokens, mask = kwargs.get("cross_attn"), kwargs.get("attention_mask")
        if tokens is None:
            return out
        if mask is not None:
            mask = mask.reshape(tokens.shape[:2]).to(device=tokens.device, dtype=torch.bool)
        if self.diffusion_model.positions == "comfyui":  # ComfyUI's own batching too: native results to the bit
            if mask is not None:
                out["attention_mask"] = comfy.conds.CONDRegular(mask)
            return out
        # each row's real tokens (a text encoder's own padding is a right-padded mask), read here on the host
        lengths = [tokens.shape[1]] * tokens.shape[0] if mask is None else [int(n) for n in mask.sum(dim=1).tolist()]
        out["c_crossattn"] = CONDPaddedTokens(tokens)
        out["txt_lengths"] = CONDTextLengths(lengths)
        return out

    def memory_required(self, input_shape, cond_shapes=None):
        """Working memory of one call on `input_shape` rows, from qwen_image_core's activation estimate."""
        cond_shapes = cond_shapes or {}
        rows, h, w = input_shape[0], input_shape[-2], input_shape[-1]
        text = max((s[1] for s in cond_shapes.get("c_crossattn", []) if len(s) > 1), default=256)
        ref_pixels = max((s[-1] for s in cond_shapes.get("ref_latents", []) if len(s) > 1), default=0)
        ref_tokens = -(-ref_pixels // 4)  # latent pixels / 2x2 patches
        wl = DiTWorkload(w * 8, h * 8, rows, False, text, ((16 * ref_tokens, 16),) if ref_tokens else (),
                         self.last_workload.compute_bytes, self.last_workload.fp16)  # fmt: skip
        self.last_workload = wl
        return sampling_bytes(wl, self.diffusion_model.config.hidden, self.diffusion_model.config.mlp_dim)


def dit_model(dit: MMDiT, dtype: torch.dtype, positions: str = "official", matmul_mode: str = "off",
              compile_backend: str = "off") -> comfy.model_patcher.ModelPatcher:  # fmt: skip
    """A native MODEL of `dit` computing in `dtype` with the `positions` convention, `matmul_mode` (matmul.MODES)
    and its blocks compiled with `compile_backend` (compiled.BACKENDS).

    One base patcher (and placement) per DiT; each call returns a clone with its own settings as object
    patches, so LoRA'd or differently configured MODELs of one file share the weights on the device.
    """
    base = getattr(dit, "native_patcher", None)  # kept on the DiT: it lives exactly as long as the weights
    if base is None:
        model = QwenPixModel(dit, dtype, device=comfy.model_management.unet_offload_device())

        def plan_for(card, budget, max_resident):
            run = model.qwenpix_placement.run  # a run_modulation.HostRun: its modulation weights stay on the host
            if run is None:
                return plan_dit(dit, budget, card, model.last_workload, 0, max_resident, activation_bytes=0)
            wl = dataclasses.replace(model.last_workload, batch=run.rows, cfg=False)  # the forwards' rows
            return plan_dit(dit, budget, card, wl, 0, max_resident, activation_bytes=0, modulation=True,
                            steps=run.steps)  # fmt: skip

        host = [m for _, m in modulation.modulation_layers(dit)] if not modulation.supported(dit) else []
        base = placed_patcher(model, model.diffusion_model, model.diffusion_model.transformer_blocks, plan_for,
                              host_modules=host)  # fmt: skip
        for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, run_modulation.outer_sample_wrapper),
                              (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
                               run_modulation.sampler_sample_wrapper)):  # fmt: skip
            base.add_wrapper_with_key(kind, run_modulation.WRAPPER_KEY, wrapper)  # the run's modulation precomputed
        dit.native_patcher = base
    m = base.clone()
    if dtype != base.model.get_dtype():
        m.set_model_compute_dtype(dtype)
    m.add_object_patch("diffusion_model.positions", positions)
    m.add_object_patch("diffusion_model.matmul", matmul_mode)  # always set: a clone sharing the model may have
    m.add_object_patch("diffusion_model.compile", compile_backend)  # left another value applied
    return m
