"""ComfyUI's quantised layers (`comfy_quant`): every format ComfyUI's loader knows loads from a tiny file in the
real layout, stays packed in memory and on the bus, and computes what comfy-kitchen's dequantisation means.

Oracle: comfy-kitchen 0.2.40 (eager backend, CPU). `C.kitchen_weights` (tools/checkpoints/comfy_quant.py) reads
a file the way ComfyUI's `comfy/ops.py _load_quantized_module` does (which tensor becomes which layout parameter,
flags at the top level or under `params`) and dequantises each layer with kitchen's own layout class; the DiT run
on those float32 weights is the reference. ComfyUI 0.3.75 (local) reads only float8_e4m3fn layers
(`_quantization_metadata`): that format is also compared with its mixed-precision Linear.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracles import inputs
from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core import quant_comfy as Q
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats import comfy_quant as F
from qwen_image_core.formats.common import assign_weights
from qwen_image_core.mmdit import MMDiT, load_dit
from qwen_image_core.ops import Linear, set_packed
from tools.checkpoints import comfy_quant as C

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = C.tiny_config()
ROOT = Path(__file__).resolve().parent.parent


def twin(model: MMDiT, path) -> MMDiT:
    """The same DiT with the oracle's float32 weights."""
    with torch.device("meta"):
        plain = MMDiT(model.config)
    shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    return assign_weights(plain, C.kitchen_weights(path, shapes), {}, path, "oracle DiT").eval()


def streamed_bytes(model, img, sigma, txt):
    """(output, bytes the block streamer moved) with every block streamed."""
    sizes, fixed = P.split_blocks(model, model.transformer_blocks)
    plan = P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1.0, 1e9, max_resident=0)
    with O.BlockStreamer(model, model.transformer_blocks, plan, O.Transfer()) as streamer:
        out = model(img, sigma, txt)
    return out, streamer.stats.bytes_moved


STORED = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "nvfp4": torch.uint8,
          "mxfp8": torch.float8_e4m3fn}  # fmt: skip
CASES = {  # id: (format, quantise options, write_dit options)
    **{f: (f, {}, {}) for f in C.FORMATS},
    "fp8-input_scale-legacy_u8": ("float8_e4m3fn", {"input_scale": True, "legacy_u8": True}, {}),
    "fp8-header": ("float8_e4m3fn", {}, {"header": True}),
    "int8-scalar": ("int8_tensorwise", {"per_channel": False}, {}),
    "int8_convrot-scale-1d": ("int8_convrot", {"flat_scale": True}, {}),
    "int8_convrot-params-2511": ("int8_convrot", {"in_params": True, "full_precision": True}, {"zero_cond_t": True}),
    "nvfp4-pre_quant-input_scale": ("nvfp4", {"pre_quant": True, "input_scale": True}, {}),
    "mxfp8-input_scale": ("mxfp8", {"input_scale": True}, {}),
    "w4a8-uniform": ("asym_w4a8_int8", {"codebook": False}, {}),
    "w4a8-asym": ("asym_w4a8_int8", {"codebook": False, "symmetric": False}, {}),
    "w6a8": ("asym_w4a8_int8", {"bits": 6}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_format_loads_packed_streams_packed_and_matches_kitchen(tmp_path, case):
    fmt, quant_opts, file_opts = CASES[case]
    path = C.write_dit(tmp_path / "f.safetensors", CFG, fmt, **file_opts, **quant_opts)
    model = load_dit(path)
    layer = model.transformer_blocks[1].img_mlp.net[2]  # in = 512
    want = "int8_tensorwise" if fmt == "int8_convrot" else fmt
    assert layer.quant is not None and layer.quant.name.startswith(want)
    assert layer.weight.dtype == STORED.get(fmt, torch.int8)  # the stored bytes, not a float copy
    assert model.zero_cond_t == bool(file_opts.get("zero_cond_t"))
    assert layer.quant.full_precision == bool(quant_opts.get("full_precision"))
    img, sigma, txt = inputs(h=8, w=10, seed=3, text_dim=CFG.text_dim)
    ref = twin(model, path)
    with torch.no_grad():
        expected = ref(img, sigma, txt)
        got = model(img, sigma, txt)
        assert (got - expected).abs().max().item() <= 1e-5
        out, moved = streamed_bytes(model, img, sigma, txt)
    assert torch.equal(out, got)
    packed = sum(t.numel() * t.element_size() for b in model.transformer_blocks for t in b.state_dict().values())
    floats = sum(t.numel() * t.element_size() for b in ref.transformer_blocks for t in b.state_dict().values())
    assert moved <= packed * 1.05 and packed < floats / 3  # packed bytes on the bus, not float32


def test_mixed_formats_per_layer(tmp_path):
    """One file, a format per kind of layer (and some plain bf16 ones): each layer reads its own."""
    kinds = {"attn.to_q": "int8_convrot", "attn.to_k": "nvfp4", "attn.to_v": "mxfp8", "attn.to_out": "awq_w4a16",
             "add_q_proj": "float8_e4m3fn", "add_k_proj": "asym_w4a8_int8", "img_mlp": "convrot_w4a4",
             "txt_mlp": "int8_tensorwise", "img_mod": "float8_e5m2"}  # fmt: skip

    def choose(name, shape):
        if not C.block_linears(name, shape):
            return None
        return next((f for part, f in kinds.items() if f".{part}" in name), None)

    path = C.write_dit(tmp_path / "mixed.safetensors", CFG, choose)
    model = load_dit(path)
    names = {type(m.quant).__name__ for m in model.modules() if isinstance(m, Linear) and m.quant is not None}
    assert names == {"Int8", "NVFP4", "MXFP8", "AWQ", "Float8", "W4A8", "ConvRotW4A4"}
    assert model.transformer_blocks[0].txt_mod[1].quant is None  # not marked: plain bf16
    assert "int8_convrot (int8 + per-row scales)" in model.storage and "the rest bf16" in model.storage
    img, sigma, txt = inputs(h=6, w=8, seed=5, text_dim=CFG.text_dim)
    with torch.no_grad():
        assert (model(img, sigma, txt) - twin(model, path)(img, sigma, txt)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_padded_formats_fit_layers_of_any_size(fmt):
    """nvfp4 / mxfp8 pad rows and columns to 16 / 32; a 40 x 24 layer reads its corner of the padded storage."""
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    tensors, conf = C.quantise(fmt, w)
    assert tensors["weight"].shape[0] > 40  # stored padded
    stored = {"l.weight": tensors.pop("weight"), **{f"l.{k}": v for k, v in tensors.items()}}
    _, packed = F.split("t", stored, {"l": F.parse_marker(conf, "test")})
    data, quant, extras = packed["l.weight"]
    assert quant.refit((40, 40)) is None  # 40 inputs pad to another width
    layer = Linear(24, 40)
    set_packed(layer, data, quant.refit((40, 24)), extras)
    expected = C.kitchen_weight(conf, {"weight": data, **extras}, (40, 24))
    assert torch.equal(layer.compute_weight(torch.float32), expected)


def test_float8_matches_comfyui_0375_mixed_precision_linear():
    """ComfyUI 0.3.75's own loader (`mixed_precision_ops`, float8_e4m3fn only): the same dequantised weight."""
    from tools.comfy_paths import import_comfy_for_oracle

    import_comfy_for_oracle()
    import comfy.ops

    torch.manual_seed(1)
    w = torch.randn(48, 64)
    tensors, conf = C.quantise("float8_e4m3fn", w, input_scale=True)
    ops = comfy.ops.mixed_precision_ops({"l": conf}, torch.float32, full_precision_mm=True)
    theirs = ops.Linear(64, 48, bias=False)
    theirs._load_from_state_dict({f"l.{k}": v for k, v in tensors.items()}, "l.", {}, True, [], [], [])
    quant = Q.Float8((48, 64), extras=("weight_scale", "input_scale"))
    ours = quant.dequantize(tensors["weight"], tensors, torch.float32)
    assert torch.equal(theirs.weight.dequantize().float(), ours)
    assert torch.equal(theirs.input_scale, tensors["input_scale"])  # kept: the native fp8 path quantises with it


def test_int8_convrot_file_stays_packed_in_memory(tmp_path):
    """A 75 MB int8_convrot file: after loading and dequantising every weight once, RSS has grown by at most
    1.15 x the file (weights held once, int8; float copies are per layer and freed)."""
    cfg = C.tiny_config(num_heads=8, mlp_dim=4096, text_dim=1024)
    path = C.write_dit(tmp_path / "qwen_image_int8_convrot.safetensors", cfg, "int8_convrot")
    script = textwrap.dedent(f"""
        import gc, psutil, torch
        from qwen_image_core.mmdit import load_dit
        from qwen_image_core.ops import Linear
        proc = psutil.Process()
        torch.ones(1) @ torch.ones(1)
        gc.collect(); before = proc.memory_info().rss
        model = load_dit({str(path)!r})
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Linear):
                    m.compute_weight(torch.float32)
        gc.collect()
        int8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.int8)
        print(proc.memory_info().rss - before, int8)
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    grown, int8 = map(int, out.stdout.split())
    size = path.stat().st_size
    assert int8 > 0.85 * size  # the blocks' int8; the embedders and final layer stay bf16
    assert grown <= 1.15 * size, f"RSS grew by {grown / size:.2f} x the file"
    print(f"int8_convrot file {size / 1e6:.1f} MB, RSS grown {grown / 1e6:.1f} MB = {grown / size:.3f} x")


# -- refused files, named --------------------------------------------------------------------------------------


def _with(tmp_path, name, extra: dict, metadata=None, base="int8_convrot"):
    path = C.write_dit(tmp_path / "base.safetensors", CFG, base)
    sd = load_file(str(path))
    sd.update(extra)
    out = tmp_path / name
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {**(f.metadata() or {}), **(metadata or {})}
    save_file({k: v for k, v in sd.items() if v is not None}, str(out), metadata=meta)
    return out


def test_unknown_format_names_itself(tmp_path):
    path = _with(
        tmp_path, "x.safetensors", {"transformer_blocks.0.attn.to_q.comfy_quant": C.marker({"format": "int3_magic"})}
    )
    with pytest.raises(
        CheckpointError, match=r"layer transformer_blocks\.0\.attn\.to_q .*'int3_magic'.*int8_tensorwise"
    ):
        load_dit(path)


def test_nvfp4_with_convrot_is_refused(tmp_path):
    path = C.write_dit(tmp_path / "n.safetensors", CFG, "nvfp4")
    sd = load_file(str(path))
    sd["transformer_blocks.0.attn.to_q.comfy_quant"] = C.marker({"format": "nvfp4", "convrot": True})
    save_file(sd, str(path), metadata=C.D.config_metadata(CFG))
    with pytest.raises(CheckpointError, match="nvfp4 with `convrot: true`"):
        load_dit(path)


def test_a_wrong_scale_shape_names_layer_and_tensor(tmp_path):
    path = _with(tmp_path, "s.safetensors", {"transformer_blocks.1.attn.to_k.weight_scale": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"int8_tensorwise layer transformer_blocks\.1\.attn\.to_k: weight_scale"):
        load_dit(path)


def test_nunchaku_bitsandbytes_and_gguf_files_are_named(tmp_path):
    n = {"transformer_blocks.0.attn.to_qkv.qweight": torch.zeros(4, 2, dtype=torch.int8),
         "transformer_blocks.0.attn.to_qkv.wscales": torch.zeros(1, 4, dtype=torch.bfloat16),
         "transformer_blocks.0.attn.to_qkv.smooth_factor": torch.zeros(4, dtype=torch.bfloat16),
         "transformer_blocks.0.attn.to_qkv.proj_down": torch.zeros(4, 2, dtype=torch.bfloat16),
         "transformer_blocks.0.attn.to_qkv.proj_up": torch.zeros(4, 2, dtype=torch.bfloat16)}  # fmt: skip
    with pytest.raises(CheckpointError, match="Nunchaku SVDQuant file: use ComfyUI-nunchaku"):
        load_dit(_with(tmp_path, "svdq-int4_r32-qwen-image.safetensors", n))
    b = {"transformer_blocks.0.attn.to_q.weight.absmax": torch.zeros(4),
         "transformer_blocks.0.attn.to_q.weight.quant_map": torch.zeros(16)}  # fmt: skip
    with pytest.raises(CheckpointError, match="bitsandbytes NF4/FP4"):
        load_dit(_with(tmp_path, "bnb.safetensors", b))
    gguf = tmp_path / "qwen-image-Q4_K.safetensors"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    with pytest.raises(CheckpointError, match="this is a GGUF file, not a safetensors file"):
        load_dit(gguf)
