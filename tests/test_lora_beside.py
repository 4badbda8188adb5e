"""LoRA beside the layer (ops.Linear): y = x W^T + s (x A^T) B^T with the factors moved once (`ops.lora_to`), equal to
the merged float32 weight's output, without weight-sized temporaries per call, and without extra bytes on the bus
when blocks stream."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.lora import load_lora, loras_applied
from qwen_image_core.mmdit import load_dit
from qwen_image_core.ops import Linear, lora_to
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_beside_the_layer_equals_the_merged_weight_and_makes_no_weight_sized_tensor():
    torch.manual_seed(0)
    layer = Linear(64, 48)
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    down, up = torch.randn(4, 64), torch.randn(48, 4) * 0.1
    layer.lora = ((down, up, 0.7),)
    lora_to(layer, "cpu", torch.float32)
    x = torch.randn(2, 5, 64)
    merged = layer.compute_weight(torch.float32)  # what the weight would be merged (float32)
    ref = torch.nn.functional.linear(x, merged, layer.bias)
    with Shapes() as seen:
        y = layer(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    factors = layer.lora
    layer.lora = ()
    with Shapes() as plain:
        y0 = layer(x)
    assert not torch.allclose(y0, ref, atol=1e-3)  # the LoRA did something
    weight_sized = [s for s in seen.shapes if s in ((48, 64), (64, 48))]
    assert weight_sized == [s for s in plain.shapes if s in ((48, 64), (64, 48))]  # only the base weight's cast:
    assert factors  # no up @ down product, no merged weight, per call


def test_factors_move_once_and_streaming_moves_no_extra_bytes(tmp_path):
    cfg = D.tiny_config()
    dit = load_dit(D.write_comfy(tmp_path / "dit.safetensors", cfg, dtype=torch.bfloat16))
    lora = load_lora(L.write_lora(tmp_path / "lora.safetensors", cfg, "kohya"), dit)
    img, txt, t = torch.randn(1, 16, 8, 8), torch.randn(1, 5, cfg.text_dim), torch.tensor([0.5])
    sizes, fixed = P.split_blocks(dit, dit.transformer_blocks)
    plan = P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1.0, 1e9, max_resident=0)  # every block streams
    moved = {}
    for name, loras in (("plain", []), ("lora", [(lora, 0.8)])):
        with loras_applied(dit, loras), torch.no_grad():
            lora_to(dit, "cpu", torch.float32)
            factor = next(m.lora[0][0] for m in dit.modules() if isinstance(m, Linear) and m.lora) if loras else None
            with O.BlockStreamer(dit, dit.transformer_blocks, plan, O.Transfer()) as streamer:
                out = dit(img, t, txt)
                dit(img, t, txt)
            moved[name] = streamer.stats.bytes_moved
            if factor is not None:  # the same factor tensor is used by every call: converted once
                assert factor.dtype == torch.float32
                assert next(m.lora[0][0] for m in dit.modules() if isinstance(m, Linear) and m.lora) is factor
                merged = out
    assert moved["lora"] == moved["plain"]
    # and beside-the-layer equals the merged-weight forward
    with loras_applied(dit, [(lora, 0.8)]), torch.no_grad():
        ref_layers = {}
        for name, m in dit.named_modules():
            if isinstance(m, Linear) and m.lora:
                ref_layers[name] = (m.weight.data, m.lora)
                m.weight.data = m.compute_weight(torch.float32)  # merge into a float32 copy
                m.lora = ()
        try:
            ref = dit(img, t, txt)
        finally:
            for name, m in dit.named_modules():
                if name in ref_layers:
                    m.weight.data, m.lora = ref_layers[name]
    assert torch.allclose(merged, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_scaled_fp8_is_dequantised_in_the_compute_dtype_as_comfyui():
    """weight.to(dtype) * scale.to(dtype): ComfyUI's scaled-fp8 arithmetic (comfy/ops.py), bit for bit in bf16."""
    from qwen_image_core.ops import cast_weight

    w = (torch.randn(12, 8) * 3).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.0173)
    ours = cast_weight(w, scale, torch.bfloat16)
    assert torch.equal(ours, w.to(torch.bfloat16) * scale.to(torch.bfloat16))
    assert torch.equal(cast_weight(w, scale, torch.float32), w.float() * scale)
