"""Builders of API-format graph nodes and result checks shared by the end-to-end tests."""

from __future__ import annotations

TEXT_DIM = 256  # the smoke DiT's text width (the smoke text encoder's hidden size)


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


def cond(seed=1, tokens=5):
    """A QwenPixTestConditioning node: seeded conditioning, `tokens` long and TEXT_DIM wide."""
    return {"class_type": "QwenPixTestConditioning", "inputs": {"seed": seed, "tokens": tokens, "dim": TEXT_DIM}}


def latent(width=32, height=32, batch=1):
    """A QwenPixEmptyLatent node of a custom size."""
    return {
        "class_type": "QwenPixEmptyLatent",
        "inputs": {"aspect": "custom", "width": width, "height": height, "batch_size": batch},
    }


def sink(value, salt=0) -> dict:
    """A QwenPixTestSink output node on a link; `salt` changes its cache key (ComfyUI runs it again)."""
    return {"class_type": "QwenPixTestSink", "inputs": {"value": list(value), "salt": salt}}


def fails(client, prompt, node: str, *fragments: str) -> str:
    """Run a prompt that must fail in `node`; the message must contain every fragment (case-insensitive)."""
    res = client.run(prompt, timeout=300)
    assert res.status == "error", f"expected an error, got {res.status}"
    err = res.error()
    assert err["node_id"] == node, err
    msg = err["exception_message"]
    print(f"\n[{err['node_type']}] {msg}")
    for f in fragments:
        assert f.lower() in msg.lower(), f"{f!r} not in: {msg}"
    return msg
