"""Jobs for `Workers.run`: each runs on every rank with the same arguments (CPU tensors, moved to the rank's
device here) and returns rank 0's result on the CPU."""

from __future__ import annotations

import torch

from .serve import Context, Interrupted


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def forward(ctx: Context, img, timestep, txt, txt_mask=None, ref_latents=None, **kwargs) -> torch.Tensor:
    """One sequence-parallel DiT forward (`SequenceParallel`, `MMDiT.forward`'s arguments)."""
    d = ctx.device
    with torch.inference_mode():
        out = ctx.forward(_to(img, d), _to(timestep, d), _to(txt, d), _to(txt_mask, d), _to(ref_latents, d), **kwargs)
    return out.cpu().clone()  # cloned outside inference mode: an ordinary tensor


def sample(ctx: Context, noise, cond, uncond=None, **kwargs) -> torch.Tensor:
    """`pipeline.sample` with the DiT's forward split over the ranks; rank 0 reports each step, and every
    rank stops at the same step when the controller asks (`Interrupted`)."""
    from ..pipeline import sample as run  # noqa: PLC0415 (the pipeline imports the encoders; only workers need it)

    def callback(i, steps, x, denoised):
        ctx.progress(i + 1, steps)
        if ctx.stop_requested():
            raise Interrupted(f"stopped after step {i + 1} of {steps}")

    with torch.inference_mode():
        out = run(ctx.model, noise, cond, uncond, forward=ctx.forward, callback=callback, **kwargs)
    return out.cpu().clone()


def placement(ctx: Context) -> dict:
    """Where this rank's DiT lives: {"streamed": block indices copied every step, "peak": the most device
    bytes held so far, "resident": blocks kept} (rank 0's; all ranks plan alike)."""
    if ctx.streamer is None:
        return {"streamed": [], "peak": None, "resident": len(ctx.model.transformer_blocks)}
    plan, t = ctx.streamer.plan, ctx.streamer.transfer
    return {"streamed": list(plan.streamed), "peak": getattr(t, "peak", None), "resident": len(plan.resident)}
