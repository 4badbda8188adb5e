"""Input specs that several sampler nodes declare alike (the noise seed, the true-CFG scale), written once.

Each call returns a fresh spec tuple, so a node's INPUT_TYPES never shares a dict with another node's."""

from __future__ import annotations

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's widest seed widget (64-bit)


def seed() -> tuple:
    """The `seed` input: an INT noise seed from 0 to 2^64 - 1."""
    return ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "tooltip": "Noise seed."})


def true_cfg(tooltip: str) -> tuple:
    """The `cfg` input: a FLOAT true-CFG scale from 0 to 100 (default 4, the official value), this node's tooltip."""
    return ("FLOAT", {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": tooltip})
