"""Image sizes: the official aspect presets and the latent geometry the DiT accepts."""

from __future__ import annotations

LATENT_CHANNELS = 16  # the VAE's z_dim
VAE_SCALE = 8  # pixels per latent pixel
DIT_MULTIPLE = 16  # VAE x8 then 2x2 patches: pixel sizes the DiT takes without padding

# (width, height) of the presets the official inference scripts use, by aspect ratio
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}


def check_size(width: int, height: int, multiple: int = DIT_MULTIPLE, limit: int = 16384) -> None:
    """Raise ValueError with the fix when a requested image size cannot be generated."""
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v > limit:
            raise ValueError(f"{name} {v} is out of range: use {multiple}..{limit} pixels")
        if v % multiple:
            lo = max(multiple, v // multiple * multiple)
            raise ValueError(f"{name} {v} is not a multiple of {multiple}: use {lo} or {lo + multiple}")


def check_reference(name: str, width: int, height: int, keep_size: bool, max_aspect: float = 200.0) -> None:
    """Raise ValueError with the fix when an edit reference of width x height pixels cannot be used."""
    if min(width, height) < 1:
        raise ValueError(f"{name} is empty ({width}x{height} pixels): connect a real image")
    if max(width, height) / min(width, height) > max_aspect:
        raise ValueError(f"{name} is {width}x{height} pixels, an aspect ratio above {max_aspect:.0f}: crop it first")
    if keep_size and min(width, height) < DIT_MULTIPLE:
        raise ValueError(
            f"{name} is {width}x{height} pixels; with 'keep size' the output takes its size and needs sides of at "
            f"least {DIT_MULTIPLE}: use the 'official' resize or a larger image"
        )


def latent_shape(width: int, height: int, batch: int = 1) -> tuple[int, int, int, int]:
    """[B, 16, H/8, W/8] for an image of width x height pixels (both multiples of 16)."""
    check_size(width, height)
    return (batch, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
