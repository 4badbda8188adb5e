"""Builders of API-format graph nodes shared by the end-to-end tests."""

from __future__ import annotations


def sampler_node(
    dit,
    latent,
    positive=("pos", 0),
    negative=("neg", 0),
    seed=0,
    steps=1,
    cfg=2.0,
    shift=3.1,
    rescale="none",
    denoise=1.0,
    schedule="shift (ComfyUI workflows)",
) -> dict:
    """A QwenPixSampler node; links are (node id, output slot) pairs."""
    return {
        "class_type": "QwenPixSampler",
        "inputs": {
            "dit": list(dit),
            "positive": list(positive),
            "negative": list(negative),
            "latent_image": list(latent),
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "schedule": schedule,
            "shift": shift,
            "cfg_rescale": rescale,
            "denoise": denoise,
        },
    }
