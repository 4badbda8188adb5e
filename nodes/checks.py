"""Checks of what a node receives, and the diagnosis of non-finite sampling: pure functions (torch, no ComfyUI).

Every problem is an `InputError` whose message names the node input, what was found and the fix, so the user
learns at the node that received a bad value what is wrong, not later as a NaN or a raw Python error.
`explain_non_finite` names the most likely cause of NaN/inf latents from what the sampler can see.
`scrub_paths` takes absolute server paths out of messages sent to API clients.
"""

from __future__ import annotations

import math
import numbers
import re
import weakref
from collections.abc import Mapping, Sequence

import torch

LATENT_CHANNELS = 16  # a Qwen-Image latent (the VAE's z_dim)
EXTREME_LORA_STRENGTH = 4.0  # |strength| from which a LoRA is the likeliest cause of NaN/inf


class InputError(ValueError):
    """A node input that cannot be used: the message names the input, its value, what is wrong and the fix."""


def _fail(text: str, fix: str) -> InputError:
    return InputError(f"{text}\nFix: {fix}")


# -- what a value is, in the user's words
_HANDLE_NAMES = {
    "DiTHandle": "a Qwen-Image diffusion model",
    "TextEncoderHandle": "a Qwen-Image text encoder",
    "TextEncoder": "a Qwen-Image text encoder",
    "ImageVAE": "a Qwen-Image VAE",
    "QwenPixPatcher": "a Qwen-Image diffusion model",
    "ModelPatcher": "ComfyUI's own MODEL",
    "CLIP": "ComfyUI's own CLIP",
    "VAE": "ComfyUI's own VAE",
}


def describe_value(value) -> str:
    """A short description of any value a socket may carry ("a Qwen-Image VAE", "an IMAGE [1, 64, 64, 3]")."""
    name = type(value).__name__
    if name in _HANDLE_NAMES:
        return _HANDLE_NAMES[name]
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, numbers.Number):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        if value.ndim == 4 and 1 <= value.shape[-1] <= 4:
            return f"an IMAGE {shape}"
        if value.ndim == 3:
            return f"a MASK or tensor {shape}"
        return f"a tensor {shape}"
    if isinstance(value, Mapping) and isinstance(value.get("samples"), torch.Tensor):
        return f"a LATENT {list(value['samples'].shape)}"
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (list, tuple)) and value[0] and isinstance(value[0][0], torch.Tensor):
            return "a CONDITIONING"
        return f"a list of {len(value)} items"
    return f"a {name}"


def check_handle(name: str, value, expected: type, what: str, source: str):
    """`value` if it is an `expected` (a pack model handle), else an error saying where the right one comes from."""
    if isinstance(value, expected):
        return value
    raise _fail(
        f"{name}: expected {what} from '{source}', got {describe_value(value)}",
        f"connect the output of '{source}' to {name}",
    )


# -- numbers
def finite_number(name: str, value, fix: str, above: float | None = None) -> float:
    """`value` as a float if it is a finite number (and > `above`), else an error naming the input and the fix.

    ComfyUI's min/max validation lets NaN through (every comparison with NaN is false), and linked values are
    not validated at all, so a node checks its numbers itself.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(f"{name}: expected a number, got {describe_value(value)}", fix)
    v = float(value)
    if math.isnan(v):
        raise _fail(f"{name} 'nan': not a number (NaN); it would make every latent NaN", fix)
    if math.isinf(v):
        raise _fail(f"{name} '{v}': infinite; it would make the latents NaN/inf", fix)
    if above is not None and not v > above:
        raise _fail(f"{name} '{v}': must be above {above:g}", fix)
    return v


# -- tensors
def non_finite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, inf count) of a tensor; (0, 0) for integer tensors. Float8 is read through its bits."""
    if t.is_meta or t.numel() == 0:
        return 0, 0
    if t.dtype == torch.float8_e4m3fn:  # no infinities; NaN is S.1111.111
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum()), 0
    if t.dtype == torch.float8_e5m2:  # exponent 11111: mantissa 0 is inf, else NaN
        bits = t.view(torch.uint8) & 0x7F
        return int((bits > 0x7C).sum()), int((bits == 0x7C).sum())
    if not (t.is_floating_point() or t.is_complex()):
        return 0, 0
    if bool(torch.isfinite(t).all()):
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def describe_non_finite(t: torch.Tensor) -> str | None:
    """ "12 of 3072 values are NaN" / "all 3072 values are NaN" / "... and 2 are infinite", or None if finite."""
    nan, inf = non_finite_counts(t)
    if not (nan or inf):
        return None
    n = t.numel()
    parts = []
    if nan:
        parts.append(f"all {n} values are NaN" if nan == n else f"{nan} of {n} values are NaN")
    if inf:
        parts.append(f"all {n} values are infinite" if inf == n else f"{inf} of {n} values are infinite")
    return " and ".join(parts)


def check_image(name: str, image) -> None:
    """An IMAGE [batch, height, width, 1-4 channels] of finite values, else an error naming the input."""
    fix_kind = f"connect an IMAGE (from Load Image or a VAE Decode) to {name}"
    if not isinstance(image, torch.Tensor):
        raise _fail(
            f"{name}: expected an IMAGE [batch, height, width, channels], got {describe_value(image)}", fix_kind
        )
    if image.ndim != 4 or not 1 <= image.shape[-1] <= 4:
        raise _fail(
            f"{name}: expected an IMAGE [batch, height, width, channels] with 1-4 channels, got {list(image.shape)}",
            fix_kind + "; a MASK needs 'Convert Mask to Image', a LATENT a VAE Decode",
        )
    if image.numel() == 0:
        raise _fail(f"{name}: the image is empty ({list(image.shape)})", fix_kind)
    bad = describe_non_finite(image)
    if bad:
        raise _fail(
            f"{name}: {bad} (an IMAGE {list(image.shape)} must hold pixel values in [0, 1])",
            f"the node that made {name} produced invalid pixels (a VAE decode or upscale in float16 often does): "
            "run it in bf16/fp32, or load the image from a file",
        )


def check_latent(name: str, latent) -> torch.Tensor:
    """The samples of a Qwen-Image LATENT ([B, 16, h, w] or one frame [B, 16, 1, h, w], finite), else an error."""
    fix = f"connect a Qwen-Image latent (Empty Latent (Qwen-Image), VAE Encode or a sampler) to {name}"
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor):
        raise _fail(f"{name}: expected a LATENT (a dict with 'samples'), got {describe_value(latent)}", fix)
    shape = list(samples.shape)
    if samples.ndim == 5 and samples.shape[2] != 1:
        raise _fail(f"{name}: the latent {shape} has {samples.shape[2]} frames; an image latent has one", fix)
    if samples.ndim not in (4, 5) or samples.shape[1] != LATENT_CHANNELS or samples.numel() == 0:
        raise _fail(f"{name}: expected a 16-channel Qwen-Image latent [batch, 16, (1,) h, w], got {shape}", fix)
    bad = describe_non_finite(samples)
    if bad:
        raise _fail(
            f"{name}: the latent {shape} holds NaN/inf: {bad}",
            "the node that made it diverged (a sampler stopped by NaN/inf, or a VAE in float16): fix that node first",
        )
    return samples


def check_conditioning(name: str, conditioning, text_dim: int | None = None) -> None:
    """A CONDITIONING: a non-empty list of [embeddings [B, T, text_dim], options dict] pairs, with finite
    embeddings, an attention_mask (if any) of one entry per token and 16-channel reference latents (if any)."""
    fix = f"connect a Qwen-Image Text Encode or Edit Encode output (or ComfyUI's Qwen text-encode nodes) to {name}"
    if not isinstance(conditioning, (list, tuple)):
        raise _fail(
            f"{name}: expected a CONDITIONING (a list of [embeddings, options]), got {describe_value(conditioning)}",
            fix,
        )
    if not conditioning:
        raise _fail(f"{name}: the conditioning is empty", fix)
    for i, entry in enumerate(conditioning):
        at = name if len(conditioning) == 1 else f"{name}[{i}]"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise _fail(f"{at}: expected an [embeddings tensor, options dict] pair, got {describe_value(entry)}", fix)
        embeds, extra = entry
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
            raise _fail(f"{at}: the embeddings are {describe_value(embeds)}, expected a float tensor", fix)
        if not isinstance(extra, Mapping):
            raise _fail(f"{at}: the options are {describe_value(extra)}, expected a dict", fix)
        if embeds.ndim != 3 or embeds.shape[1] == 0 or (text_dim is not None and embeds.shape[-1] != text_dim):
            raise _fail(
                f"{at}: the conditioning is {list(embeds.shape)}, this diffusion model takes "
                f"[1, tokens, {text_dim or 'width'}]",
                "encode the prompt with the text encoder that belongs to this model (Qwen2.5-VL-7B for Qwen-Image)",
            )
        bad = describe_non_finite(embeds)
        if bad:
            raise _fail(
                f"{at}: the embeddings {list(embeds.shape)} hold NaN/inf: {bad}",
                "encode the prompt again; if it repeats, the text encoder's file is damaged or it computes in float16",
            )
        _check_mask(at, extra.get("attention_mask"), embeds)
        _check_references(at, extra.get("reference_latents"))


def _check_mask(at: str, mask, embeds: torch.Tensor) -> None:
    if mask is None:
        return
    b, t = embeds.shape[:2]
    fix = "connect the conditioning straight from a text-encode node: a node in between changed the embeddings or "
    fix += "their attention_mask but not both"
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise _fail(f"{at}: attention_mask is {describe_value(mask)}, expected a tensor [batch, tokens]", fix)
    if mask.ndim != 2 or mask.shape[1] != t or mask.shape[0] not in (1, b):
        raise _fail(
            f"{at}: attention_mask is {list(mask.shape)}, the embeddings are {list(embeds.shape)}: "
            f"the mask needs one entry per token, [{b}, {t}]",
            fix,
        )
    if describe_non_finite(mask):
        raise _fail(f"{at}: attention_mask holds NaN/inf ({describe_non_finite(mask)})", fix)


def _check_references(at: str, refs) -> None:
    if refs is None:
        return
    fix = "encode the references with the Qwen-Image VAE (Qwen-Image Edit Encode, or TextEncodeQwenImageEditPlus)"
    if not isinstance(refs, (list, tuple)):
        raise _fail(f"{at}: reference_latents is {describe_value(refs)}, expected a list of latents", fix)
    for j, r in enumerate(refs):
        key = f"reference_latents[{j}]"
        if not isinstance(r, torch.Tensor):
            raise _fail(f"{at}: {key} is {describe_value(r)}, expected a latent tensor [1, 16, 1, h, w]", fix)
        one_frame = r.ndim == 4 or (r.ndim == 5 and r.shape[2] == 1)
        if not one_frame or r.shape[1] != LATENT_CHANNELS or r.numel() == 0:
            raise _fail(
                f"{at}: {key} is {list(r.shape)}, expected a 16-channel Qwen-Image latent [1, 16, 1, h, w]", fix
            )
        bad = describe_non_finite(r)
        if bad:
            raise _fail(f"{at}: {key}: {bad}", fix + "; the reference image itself may hold NaN")


def check_text(name: str, text) -> str:
    """A prompt that can be tokenised: a str without lone UTF-16 surrogates (which no encoding can represent)."""
    if not isinstance(text, str):
        raise _fail(f"{name}: expected text, got {describe_value(text)}", f"type the {name} into the widget")
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise _fail(
                f"{name}: character {i + 1} is a lone UTF-16 surrogate (U+{ord(ch):04X}), half of a character that "
                "cannot be encoded as text",
                f"remove or retype that character; the client that sent the {name} split an emoji or symbol in two",
            )
    return text


# -- why sampling produced NaN/inf
_WEIGHTS_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


def non_finite_weights(model: torch.nn.Module) -> str | None:
    """Which of the model's tensors hold NaN/inf ("3 tensors, e.g. proj_out.weight (12 NaN)"), or None.

    Reads every weight once (only when sampling went non-finite) and caches the answer per model: a loaded
    model's weights never change (LoRAs are added at cast time, not written).
    """
    if model in _WEIGHTS_CHECKED:
        return _WEIGHTS_CHECKED[model]
    bad = []
    for key, t in (*model.named_parameters(), *model.named_buffers()):
        if t is None:
            continue
        nan, inf = non_finite_counts(t.detach())
        if nan or inf:
            bad.append(f"{key} ({', '.join(s for s in (nan and f'{nan} NaN', inf and f'{inf} inf') if s)})")
    answer = None if not bad else f"{len(bad)} tensor{'s' if len(bad) > 1 else ''}, e.g. {bad[0]}"
    _WEIGHTS_CHECKED[model] = answer
    return answer


def explain_non_finite(
    dtype: torch.dtype,
    compute_choice: str,
    model_name: str,
    weights: str | None,
    loras: Sequence[tuple[str, float]] = (),
    bad_inputs: Sequence[tuple[str, str]] = (),
) -> tuple[str, str, str]:
    """(input, its value, cause and fix) of NaN/inf latents, the likeliest cause first: non-finite inputs,
    non-finite model weights, float16 compute, an extreme LoRA strength, any LoRA, else the precision."""
    if bad_inputs:
        name, what = bad_inputs[0]
        return name, "non-finite", f"{name} holds NaN/inf ({what})\nFix: fix the node that made {name} first"
    if weights:
        return (
            "dit",
            model_name,
            f"the model file holds non-finite weights ({weights})\nFix: download the file again, or choose another",
        )
    if dtype == torch.float16:
        return (
            "compute_dtype",
            compute_choice,
            "float16 cannot hold this model's activations\nFix: set compute_dtype to bf16 (or fp32) on the loader",
        )
    active = [(n, s) for n, s in loras if s != 0]
    extreme = [(n, s) for n, s in active if abs(s) >= EXTREME_LORA_STRENGTH]
    if extreme:
        n, s = extreme[0]
        return (
            "dit",
            f"{model_name} + LoRA {n} @ {s:g}",
            f"the LoRA '{n}' at the extreme strength {s:g}\nFix: lower its strength on the Qwen-Image LoRA node "
            "(1 is usual, Lightning LoRAs use 1)",
        )
    if active:
        names = ", ".join(f"'{n}' @ {s:g}" for n, s in active)
        return (
            "dit",
            f"{model_name} + {len(active)} LoRA{'s' if len(active) > 1 else ''}",
            f"a LoRA ({names}): its factors are finite but too large for this model\nFix: lower the LoRA "
            "strength, or run without it to confirm",
        )
    return (
        "compute_dtype",
        compute_choice,
        f"the {str(dtype).removeprefix('torch.')} precision (the weights and inputs are finite, no LoRA is active)\n"
        "Fix: set compute_dtype to fp32 on the loader",
    )


def non_finite_message(
    step: int,
    steps: int,
    dtype: torch.dtype,
    compute_choice: str,
    dit=None,
    inputs: Mapping[str, torch.Tensor | None] | None = None,
    *,
    model: torch.nn.Module | None = None,
    model_name: str | None = None,
    loras: Sequence[tuple[object, float]] | None = None,
) -> str:
    """The sampler's error when the latents stop being finite at `step` (0-based) of `steps`.

    What it can see: the tensors the sampler was given ({input: tensor}), the model (its weights are read once),
    its file name and the active LoRAs ((a Lora or a name, strength)). `dit`, a DiT handle (`.model`, `.name`,
    `.loras`), supplies whichever of these is not passed explicitly.
    """
    bad = [(k, d) for k, t in (inputs or {}).items() if isinstance(t, torch.Tensor) and (d := describe_non_finite(t))]
    model = model if model is not None else getattr(dit, "model", None)
    model_name = model_name if model_name is not None else getattr(dit, "name", "the diffusion model")
    loras = loras if loras is not None else getattr(dit, "loras", ())
    weights = non_finite_weights(model) if isinstance(model, torch.nn.Module) and not bad else None
    named = [(_lora_name(lo), float(s)) for lo, s in loras]
    name, value, cause = explain_non_finite(dtype, compute_choice, model_name, weights, named, bad)
    return (
        f"{name} '{value}': sampling produced NaN/inf at step {step + 1} of {steps} "
        f"(computing in {str(dtype).removeprefix('torch.')}); stopped. Likely cause: {cause}"
    )


def _lora_name(lora) -> str:
    return re.split(r"[\\/]", str(getattr(lora, "path", lora)))[-1]


# -- absolute paths out of messages
_ABSOLUTE = re.compile(r"(?<![\w.~/\\:)\]-])(?:/|[A-Za-z]:[\\/])[^\s'\"`<>|,;:()\[\]{}]*")


def scrub_paths(text: str, roots: Mapping[str, str]) -> str:
    """`text` with absolute paths rewritten: those under a root directory (absolute path -> shown prefix, e.g.
    ComfyUI's model folders -> "models/loras") as prefix/relative path, every other one as its base name."""

    def shown(prefix: str, rest: str) -> str:
        return prefix + rest.replace("\\", "/")

    for root in sorted(roots, key=len, reverse=True):
        root_s = root.rstrip("/\\")
        if not root_s:
            continue
        pattern = re.escape(root_s) + r"(?![\w.-])([\\/][^\s'\"`<>|,;:()\[\]{}]*)?"
        text = re.sub(pattern, lambda m, p=roots[root]: shown(p, m.group(1) or ""), text)

    def base(m: re.Match) -> str:
        path = m.group(0)
        tail = path[len(path.rstrip(".")) :]  # a full stop after the path stays outside it
        name = [p for p in re.split(r"[\\/]", path.rstrip(".")) if p]
        return (name[-1] if name else path.rstrip(".")) + tail

    return _ABSOLUTE.sub(base, text)
