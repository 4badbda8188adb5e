"""AdaLN modulation precomputed for a whole sampling run, so its weights are read once per run, not per step.

Each block's `img_mod` / `txt_mod` (a Linear on silu(temb)) and the final layer's `norm_out.linear` depend only on
the timestep, and a run's timesteps are its sigma schedule, known before the first step. These layers hold a third
of the DiT's bytes (gpu_review §A5: 33.3 %). `precompute` evaluates them for every step up front, each weight cast
once (`ops.Linear.compute_weight`) and applied per step with exactly the per-step forward's ops and shapes (one
GEMM per step with the same rows), so the numbers are the same bit for bit. `MMDiT.forward(modulation=...)` takes
one step's entry; `offload_plan.plan_dit(modulation=True)` leaves these weights out of the blocks' bytes (more
blocks stay resident) and `BlockStreamer(skip=modulation_layers(model))` leaves them on the host.

Which entry applies must be known on the host (finding it on the device would wait for the device): the core
sampler (`pipeline.sample`) knows its step index. ComfyUI's samplers pass the current sigma only as a device tensor;
the bridged native MODEL follows the steps through the sampler's callback instead, for the samplers that evaluate
only the schedule's sigmas, and computes per call for the others (nodes/run_modulation.py). There the run's
decision is made before ComfyUI loads the model, so a precomputing run's plan is `plan_dit(modulation=True)` too
(the weights on the host, their device bytes holding more blocks), while a run with midpoints gets them on the
device as the rest; the same loaded model switches between the two, moving only the difference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Linear


@dataclass(frozen=True)
class StepModulation:
    """One step's AdaLN outputs, in the compute dtype on the compute device."""

    sigma: float  # the step's timestep (host float, for messages)
    img: tuple[torch.Tensor, ...]  # per block: img_mod(temb) [R, 6D]; R = rows, 2 x rows with zero_cond_t
    txt: tuple[torch.Tensor, ...]  # per block: txt_mod(temb[:rows]) [rows, 6D]
    out: torch.Tensor  # norm_out.linear(silu(temb[:rows])) [rows, 2D]

    def blocks(self, temb: torch.Tensor, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's (img_mod, txt_mod) outputs for a forward whose timestep embedding is `temb` and batch
        `rows`; a clear error when this entry was made for another batch, dtype or device."""
        want = (temb.shape[0], rows, temb.dtype, temb.device)
        have = (self.img[0].shape[0], self.out.shape[0], self.out.dtype, self.out.device)
        if want != have:
            raise ValueError(
                f"the precomputed modulation (sigma {self.sigma:g}) is for {have[0]} timestep rows, a batch of "
                f"{have[1]}, {have[2]} on {have[3]}; this forward has {want[0]}, {want[1]}, {want[2]} on {want[3]}"
            )
        return list(zip(self.img, self.txt, strict=True))


@dataclass
class ModulationTable:
    """The modulation of every step of a run; `at` is the step the next forward belongs to (the sampler sets it)."""

    steps: list[StepModulation]
    reads: Counter = field(default_factory=Counter)  # layer name -> weight casts (1 per run)
    bytes_read: int = 0  # bytes of the modulation weights read to build the table (once per run)
    at: int = 0  # index of the current step

    def current(self) -> StepModulation:
        if not 0 <= self.at < len(self.steps):
            raise IndexError(f"step {self.at} of a run precomputed for {len(self.steps)} steps")
        return self.steps[self.at]

    @property
    def nbytes(self) -> int:
        """Device bytes the table holds."""
        return sum(t.numel() * t.element_size() for s in self.steps for t in (*s.img, *s.txt, s.out))


def modulation_layers(model: nn.Module) -> list[tuple[str, Linear]]:
    """(checkpoint name, layer) of every AdaLN modulation Linear of an MMDiT: each block's img_mod.1 and
    txt_mod.1, and norm_out.linear."""
    named = []
    for i, block in enumerate(model.transformer_blocks):
        named += [(f"transformer_blocks.{i}.img_mod.1", block.img_mod[1]),
                  (f"transformer_blocks.{i}.txt_mod.1", block.txt_mod[1])]  # fmt: skip
    return [*named, ("norm_out.linear", model.norm_out.linear)]


def supported(model: nn.Module) -> str:
    """'' when the model's modulation can be precomputed, else the reason it cannot."""
    if getattr(model.config, "additional_t_cond", False):
        return "Qwen-Image-Layered adds a per-call timestep condition to the embedding; modulation is computed per step"
    return ""


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[int]:
    """The module's tensors on `device` for a moment (copies where they live elsewhere, e.g. a streamed block's
    host copy or a weight kept on the host), restored after; yields the bytes this read."""
    tensors = _tensors(module)
    saved = [t.data for t in tensors]
    try:
        for t in tensors:
            if t.device != device:
                t.data = t.data.to(device)
        yield sum(t.numel() * t.element_size() for t in tensors)
    finally:
        for t, d in zip(tensors, saved, strict=True):
            t.data = d


def precompute(model: nn.Module, sigmas: Sequence[float] | torch.Tensor, rows: int, dtype: torch.dtype,
               device: torch.device | str | None = None, zero_cond: bool = False) -> ModulationTable:  # fmt: skip
    """The modulation of an MMDiT for each sigma of a run (the timesteps its forwards receive, e.g. sigmas[:-1]),
    for forwards of `rows` rows computing in `dtype` on `device` (default: where img_in's weight is); zero_cond:
    the forwards use zero_cond_t (reference tokens at t = 0, rows..2 rows of the embedding).

    Exactly the forward's computation: the same sinusoid and timestep embedder per step, each modulation layer's
    weight cast once and applied to each step's [R, D] input (`ops.Linear.forward_with`)."""
    why = supported(model)
    if why:
        raise ValueError(why)
    cfg = model.config
    device = torch.device(device) if device is not None else model.img_in.weight.device
    from .mmdit import timestep_sinusoid  # noqa: PLC0415  (mmdit imports this module's users, not this module)

    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    table = ModulationTable([])
    embedder = model.time_text_embed.timestep_embedder
    with on_device(embedder, device):
        silu = []
        for s in values:  # as MMDiT.forward: float32 timesteps, t = 0 rows appended for zero_cond_t
            t = torch.full((rows,), s, dtype=torch.float32, device=device)
            if zero_cond:
                t = torch.cat([t, torch.zeros_like(t)])
            silu.append(F.silu(embedder(timestep_sinusoid(t, cfg.timestep_dim).to(dtype))))  # [R, D]
    outputs: dict[str, list[torch.Tensor]] = {}
    for name, layer in modulation_layers(model):
        with on_device(layer, device) as nbytes:
            w = layer.compute_weight(dtype, lora=False)  # the one read of this weight in the run
            table.reads[name] += 1
            table.bytes_read += nbytes
            full = name.endswith("img_mod.1")  # img_mod sees every row; txt_mod and norm_out the first `rows`
            outputs[name] = [layer.forward_with(x if full else x[:rows], w) for x in silu]
            del w
    n = len(model.transformer_blocks)
    for k, s in enumerate(values):
        img = tuple(outputs[f"transformer_blocks.{i}.img_mod.1"][k] for i in range(n))
        txt = tuple(outputs[f"transformer_blocks.{i}.txt_mod.1"][k] for i in range(n))
        table.steps.append(StepModulation(s, img, txt, outputs["norm_out.linear"][k]))
    return table
