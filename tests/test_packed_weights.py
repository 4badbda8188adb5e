"""The packed-weight seam (`ops.Quant`, `ops.set_packed`, `formats.common.assign_weights(packed=...)`): a layer
keeps the stored bytes and dequantises at the cast; LoRAs and patches apply on top; the executor streams the
packed bytes. Tested with a toy format (int8 with a per-row scale); the real formats live in formats/."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.common import assign_weights
from qwen_image_core.mmdit import MMDiT
from qwen_image_core.ops import Linear, set_packed
from tools.checkpoints import dit as D


@dataclass(frozen=True)
class RowInt8:
    """Toy format: int8 [out, in] times a float32 scale per row."""

    shape: tuple[int, int]
    name: str = "toy int8 rows"
    extras: tuple[str, ...] = ("weight_scale",)

    def dequantize(self, packed, extras, dtype):
        return (packed.to(torch.float32) * extras["weight_scale"][:, None].float()).to(dtype)


def quantise(w: torch.Tensor):
    scale = w.abs().amax(dim=1) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def test_a_packed_layer_dequantises_at_the_cast_and_keeps_its_bytes():
    torch.manual_seed(0)
    layer = Linear(8, 6)
    q, scale = quantise(torch.randn(6, 8))
    set_packed(layer, q, RowInt8((6, 8)), {"weight_scale": scale})
    x = torch.randn(3, 8)
    ref = x @ (q.float() * scale[:, None]).T + layer.bias
    assert torch.allclose(layer(x), ref, atol=1e-6)
    assert layer.weight.dtype == torch.int8 and set(layer.state_dict()) == {"weight", "bias", "weight_scale"}
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    layer.lora = ((down, up, 0.5),)
    assert torch.allclose(layer(x), ref + 0.5 * x @ (up @ down).T, atol=1e-5)
    layer.lora, layer.weight_fns = (), (lambda w: w * 2,)
    assert torch.allclose(layer(x) - layer.bias, 2 * (ref - layer.bias), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        set_packed(Linear(8, 5), q, RowInt8((6, 8)), {"weight_scale": scale})


def packed_dit(cfg):
    sd = D.state_dict(cfg, seed=1)
    packed, tensors = {}, {}
    for k, v in sd.items():
        if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.ndim == 2:
            q, s = quantise(v)
            packed[k] = (q, RowInt8(tuple(v.shape)), {"weight_scale": s})
        else:
            tensors[k] = v
    with torch.device("meta"):
        model = MMDiT(cfg)
    return assign_weights(model, tensors, {}, "toy.safetensors", "Qwen-Image DiT", packed).eval(), packed, tensors


def test_a_dit_with_packed_blocks_equals_its_dequantised_twin_and_streams_packed_bytes():
    cfg = D.tiny_config()
    model, packed, tensors = packed_dit(cfg)
    plain = {k: p[1].dequantize(p[0], p[2], torch.float32) for k, p in packed.items()}
    with torch.device("meta"):
        twin = MMDiT(cfg)
    twin = assign_weights(twin, {**tensors, **plain}, {}, "twin", "Qwen-Image DiT").eval()
    img, txt, t = torch.randn(1, 16, 8, 6), torch.randn(1, 5, cfg.text_dim), torch.tensor([0.6])
    with torch.no_grad():
        ref = twin(img, t, txt)
        assert torch.equal(model(img, t, txt), ref)
        sizes, fixed = P.split_blocks(model, model.transformer_blocks)
        plan = P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1.0, 1e9, max_resident=0)  # stream every block
        transfer = O.Transfer()
        with O.BlockStreamer(model, model.transformer_blocks, plan, transfer) as streamer:
            assert torch.equal(model(img, t, txt), ref)
        packed_bytes = sum(
            t.numel() * t.element_size() for b in model.transformer_blocks for t in b.state_dict().values()
        )
        float_bytes = sum(
            t.numel() * t.element_size() for b in twin.transformer_blocks for t in b.state_dict().values()
        )
        assert streamer.stats.bytes_moved <= packed_bytes * 1.05 < float_bytes / 3  # int8 on the bus, not float32


def test_a_packed_weight_of_the_wrong_shape_is_named():
    cfg = D.tiny_config()
    _, packed, tensors = packed_dit(cfg)
    key = next(iter(packed))
    q, quant, extras = packed[key]
    packed[key] = (q, RowInt8((quant.shape[0] + 1, quant.shape[1])), extras)
    with torch.device("meta"):
        model = MMDiT(cfg)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        assign_weights(model, tensors, {}, "toy.safetensors", "Qwen-Image DiT", packed)
