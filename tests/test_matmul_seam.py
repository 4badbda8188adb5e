"""The native quantised matmul seam (issue 13, 4): fp8 (`torch._scaled_mm`, per-token activation scales) and int8
(`torch._int_mm`, the comfy_quant int8 files) against references: comfy-kitchen's eager int8_linear, and the
float64 product of the same quantised operands; the fp8 float twin against the CPU `_scaled_mm`; the default off;
LoRAs beside; weight patches fall back to the dequantised path; a whole DiT in each mode stays near the float one."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import matmul as MM
from qwen_image_core.mmdit import load_dit
from qwen_image_core.ops import Linear, set_packed
from qwen_image_core.quant_comfy import Int8
from tools.checkpoints import comfy_quant as CQ
from tools.checkpoints import dit as D

kitchen = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
pytestmark = pytest.mark.usefixtures("one_thread")


def int8_layer(n=48, k=512, per_row=True, convrot=256, seed=0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n)
    layer.bias.data = torch.randn(n, generator=g) * 0.1
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n if per_row else 1, generator=g) * 1e-3 + 1e-4
    set_packed(layer, q, Int8((n, k), convrot=convrot), {"weight_scale": scale})
    return layer


def fp8_layer(n=48, k=64, per_row=False, seed=0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n)
    layer.bias.data = torch.randn(n, generator=g) * 0.1
    layer.weight.data = (torch.randn(n, k, generator=g) * 2).to(torch.float8_e4m3fn)
    layer.weight_scale = torch.rand(n if per_row else 1, generator=g) * 0.05 + 0.01
    return layer


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("convrot", [0, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_equals_comfy_kitchens_eager_int8_linear(per_row, convrot, dtype):
    layer = int8_layer(per_row=per_row, convrot=convrot)
    x = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(1)).to(dtype)
    with MM.using(layer, "int8") as n:
        y = layer(x)
    assert n == 1
    want = kitchen.int8_linear(x, layer.weight, layer.weight_scale, layer.bias.to(dtype), dtype,
                               convrot=bool(convrot), convrot_groupsize=convrot or 256)  # fmt: skip
    assert y.dtype == dtype and torch.equal(y, want)
    # the straightforward formula: dequantised operands multiplied in float64
    xr = MM.rotate(x, convrot) if convrot else x
    xq, xs = MM.quantize_rows_int8(xr.reshape(-1, 512))
    w = layer.weight.double() * layer.weight_scale.double().reshape(-1, 1)
    ref = ((xq.double() * xs.double()) @ w.t()).to(dtype) + layer.bias.to(dtype)
    assert torch.allclose(y.reshape(-1, 48).double(), ref.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                          atol=1e-5)  # fmt: skip
    # and near the dequantised float path (the activation's int8 rounding)
    off = layer(x)
    assert (y - off).norm() / off.norm() < 2e-2 and not torch.equal(y, off)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_native_and_twin_equal_the_quantised_product(per_row, dtype):
    layer = fp8_layer(per_row=per_row)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    xq, xs = MM.quantize_rows_fp8(x.reshape(-1, 64))
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (15, 1)
    ws = layer.weight_scale.float()
    ref = ((xq.double() * xs.double()) @ (layer.weight.double() * ws.double().reshape(-1, 1)).t()).to(dtype)
    native = MM.fp8_mm(xq, xs, layer.weight, ws, dtype, native=True)  # PyTorch's CPU _scaled_mm
    twin = MM.fp8_mm(xq, xs, layer.weight, ws, dtype, native=False)
    tol = dict(rtol=8e-3, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(native.double(), ref.double(), **tol) and torch.allclose(twin.double(), ref.double(), **tol)
    if per_row:  # per-row weight scales come from comfy_quant files (below); a plain layer's scale is per tensor
        return
    with MM.using(layer, "fp8"):
        y = layer(x)
    assert torch.allclose(y.double(), (ref + layer.bias.to(dtype)).reshape(3, 5, 48).double(), **tol)
    off = layer(x)
    assert (y - off).float().norm() / off.float().norm() < 0.1 and not torch.equal(y, off)


def test_off_by_default_lora_beside_and_patches_fall_back():
    layer = int8_layer(convrot=0)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(3))
    assert layer.matmul is None and MM.covered(layer, "off") == [] and MM.covered(layer, "fp8") == []
    down, up = torch.randn(2, 512) * 0.1, torch.randn(48, 2) * 0.1
    with MM.using(layer, "int8"):
        base = layer(x)
        layer.lora = ((down, up, 0.5),)
        assert torch.allclose(layer(x), base + 0.5 * (x @ down.t()) @ up.t(), atol=1e-5)
        layer.lora = ()
        layer.weight_fns = (lambda w: w * 2,)  # a patch of the whole weight: the float path honours it
        assert torch.equal(layer(x), layer.forward_with(x, layer.compute_weight(x.dtype, lora=False)))
        layer.weight_fns = ()
    assert layer.matmul is None  # restored
    with pytest.raises(ValueError, match="matmul mode 'int4'"):
        MM.covered(layer, "int4")


@pytest.mark.parametrize("fmt,mode", [("int8_convrot", "int8"), ("int8_tensorwise", "int8"),
                                      ("float8_e4m3fn", "fp8")])  # fmt: skip
def test_a_quantised_dit_in_each_mode_stays_near_the_dequantised_one(tmp_path, fmt, mode):
    cfg = CQ.tiny_config()
    dit = load_dit(CQ.write_dit(tmp_path / "dit.safetensors", cfg, fmt))
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 6, cfg.text_dim, generator=g)
    t = torch.tensor([0.6])
    with torch.no_grad():
        off = dit(img, t, txt)
        with MM.using(dit, mode) as n:
            y = dit(img, t, txt)
    assert n == 14 * cfg.num_layers  # every block linear the file quantises (the modulation, q k v, out, MLP x 2)
    assert n == sum(isinstance(m, Linear) and m.quant is not None for m in dit.modules())
    assert "native" in MM.coverage(dit, mode)
    assert (y - off).norm() / off.norm() < 0.05 and not torch.equal(y, off)


def test_plain_fp8_file_is_covered(tmp_path):
    cfg = D.tiny_config()
    dit = load_dit(D.write_fp8(tmp_path / "fp8.safetensors", cfg))
    assert len(MM.covered(dit, "fp8")) == sum(isinstance(m, Linear) for m in dit.modules())
    assert MM.covered(dit, "int8") == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_activation_quantiser_equals_the_plain_formula_bit_for_bit(dtype):
    """quantize_rows_fp8 (two passes, the clamp implied) = e4m3(clamp(float32(x) / (amax / 448), +-448)): rows of
    every magnitude, all-zero, NaN and inf rows, rows whose maximum repeats; and, as amax, every positive finite
    bf16 / fp16 value (the element that meets the clamp)."""

    def plain(x):
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / MM.FP8_MAX).clamp(min=MM.MIN_SCALE)
        return (x.float() / scale).clamp(-MM.FP8_MAX, MM.FP8_MAX).to(torch.float8_e4m3fn), scale

    g = torch.Generator().manual_seed(5)
    span = 4 if dtype == torch.float16 else 35
    x = (torch.randn(96, 512, generator=g) * torch.logspace(-span, span, 96)[:, None]).to(dtype)
    x[3], x[5, 7], x[6, 8], x[7, 9] = 0, float("nan"), float("inf"), -float("inf")
    x[9] = x[9, 0]
    x[10] = torch.where(torch.rand(512, generator=g) > 0.5, x[10, 0], -x[10, 0])
    rows = [x]
    if dtype != torch.float32:
        top = 0x7F80 if dtype == torch.bfloat16 else 0x7C00
        rows.append(torch.arange(1, top, dtype=torch.int32).to(torch.int16).view(dtype)[:, None].repeat(1, 2))
    for t in rows:
        (q, s), (q_ref, s_ref) = MM.quantize_rows_fp8(t), plain(t)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.allclose(s, s_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_bias_is_added_before_the_one_rounding_natively_and_in_the_twin(dtype):
    layer = fp8_layer(per_row=True)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    xq, xs = MM.quantize_rows_fp8(x)
    ws, bias = layer.weight_scale.float(), layer.bias.to(dtype)
    exact = ((xq.double() * xs.double()) @ (layer.weight.double() * ws.double().reshape(-1, 1)).t()) + bias.double()
    native = MM.fp8_mm(xq, xs, layer.weight, ws, dtype, native=True, bias=bias)
    twin = MM.fp8_mm(xq, xs, layer.weight, ws, dtype, native=False, bias=bias)
    # float32 sums of exact products (their order may differ), one rounding to `dtype`
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(native.double(), twin.double(), rtol=ulp, atol=1e-6)
    assert torch.allclose(twin.double(), exact, rtol=4e-3 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert MM.native_dtype(torch.device("cpu"), torch.float16)
    cuda = torch.device("cuda")
    assert MM.native_dtype(cuda, torch.bfloat16) and not MM.native_dtype(cuda, torch.float16)
