"""LoRA on the DiT without touching its weights.

A LoRA is kept as its low-rank factors and added when a layer's weight is cast for compute
(`ops.cast_weight`): W_eff = dequant(W) + sum_i strength_i * scale_i * (up_i @ down_i), in float32. So
it is exact on float8 bases (no re-quantisation, the cause of line artifacts with naively merged
Lightning LoRAs), several LoRAs stack, and removing them restores the base bit for bit because the base
tensors are never written. The cost is one small matmul per patched layer per call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import CheckpointError, open_checkpoint
from .formats.lora import LoraFactor, parse_lora
from .ops import Linear


@dataclass(frozen=True)
class Lora:
    """The factors of one LoRA file, matched to a model's layers."""

    path: str
    factors: tuple[LoraFactor, ...]

    def __repr__(self) -> str:  # short (no tensors), and without the directory: reprs reach logs and API clients
        return f"Lora({os.path.basename(self.path)!r}, {len(self.factors)} layers)"


def _linears(model: nn.Module) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def load_lora(path: str | os.PathLike, model: nn.Module) -> Lora:
    """Read a LoRA file in any supported format and check it against the model's layers and shapes."""
    return read_lora(path, linear_shapes(model))


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of a model's linear layers (ours or any torch.nn.Linear: a host's own model)."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_lora(path: str | os.PathLike, shapes: dict[str, tuple[int, int]]) -> Lora:
    """Read a LoRA file in any supported format and check it against layers named by `shapes` ({name: (out, in)})."""
    factors = parse_lora(open_checkpoint(path), shapes)
    for f in factors:
        out_f, in_f = shapes[f.module]
        if (f.up.shape[0], f.down.shape[1]) != (out_f, in_f):
            raise CheckpointError(
                f"{path}: LoRA for {f.module} is {f.up.shape[0]}x{f.down.shape[1]}, the layer is "
                f"{out_f}x{in_f}: it was made for another model"
            )
    return Lora(str(path), tuple(factors))


def set_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> None:
    """Make exactly these (LoRA, strength) pairs active on the model, replacing any active before."""
    layers = _linears(model)
    patches: dict[str, list] = {name: [] for name in layers}
    for lora, strength in loras:
        if strength == 0:
            continue
        for f in lora.factors:
            patches[f.module].append((f.down, f.up, strength * f.scale))
    for name, layer in layers.items():
        layer.lora = tuple(patches[name])


@contextmanager
def loras_applied(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> Iterator[nn.Module]:
    """Activate LoRAs for the duration of a block (one sampling run); the previous set comes back after,
    also when the block is interrupted or fails."""
    layers = _linears(model)
    before = {name: layer.lora for name, layer in layers.items()}
    set_loras(model, loras)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.lora = before[name]


def effective_weight(layer: Linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a layer computes with (dequantised, LoRAs added), for inspection and tests."""
    return layer.compute_weight(dtype)
