"""GGUF DiTs (load_dit on *.gguf) against the `gguf` package's own reader and dequantisers: for every type of the
published Qwen-Image GGUFs a tiny file in the real layout loads with its quantised linear weights packed (uint8
blocks, dequantised at the cast), computes what our DiT computes on gguf's dequantised float32 weights, streams
the packed bytes, takes LoRAs exactly, and holds no more memory than the file; key conventions and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf as reference
import numpy as np
import pytest
import torch

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core import quant_gguf as Q
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.common import assign_weights
from qwen_image_core.lora import load_lora, loras_applied
from qwen_image_core.mmdit import MMDiT, load_dit
from qwen_image_core.ops import Linear
from tools.checkpoints import dit as D
from tools.checkpoints import gguf as G
from tools.checkpoints.lora import write_lora

CFG = G.tiny_config()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: G.write_gguf(folder / f"qwen-image-{t}.gguf", CFG, t) for t in G.TYPES}


def twin(path, cfg=CFG) -> MMDiT:
    """Our DiT on the float32 weights gguf's reader and dequantisers give for the file."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return assign_weights(model, G.dequantized(path), {}, path, "Qwen-Image DiT").eval()


def inputs(cfg=CFG, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 8, 6, generator=g), torch.tensor([0.6]), torch.randn(1, 5, cfg.text_dim, generator=g)


def max_diff(a, b) -> float:
    with torch.no_grad():
        return float((a(*inputs()) - b(*inputs())).abs().max())


def stored_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("qtype", G.TYPES)
def test_a_gguf_dit_is_packed_equals_gguf_s_weights_and_streams_its_bytes(files, qtype):
    path = files[qtype]
    model, types = load_dit(path), G.file_types(path)
    assert model.storage.startswith(f"GGUF {qtype} (")
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        t = Q.TYPES[types[name + ".weight"]]
        if t.plain is None:  # packed: the file's blocks as they are, dequantised at the cast
            assert layer.quant.name == f"gguf {t.name}" and layer.weight.dtype == torch.uint8
            assert layer.weight.numel() == layer.in_features * layer.out_features // t.block * t.nbytes
        else:
            assert layer.quant is None and layer.weight.dtype == t.plain
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32  # norms and biases stay F32
    ref = twin(path)
    diff = max_diff(model, ref)
    print(f"\n{qtype}: max |ours - DiT on gguf's dequantised weights| = {diff:.3g}")
    assert diff <= 1e-5

    sizes, fixed = P.split_blocks(model, model.transformer_blocks)
    plan = P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1.0, 1e9, max_resident=0)  # stream every block
    with torch.no_grad(), O.BlockStreamer(model, model.transformer_blocks, plan, O.Transfer()) as streamer:
        assert float((model(*inputs()) - ref(*inputs())).abs().max()) <= 1e-5
    packed = sum(stored_bytes(b) for b in model.transformer_blocks)
    assert abs(streamer.stats.bytes_moved - packed) <= 0.05 * packed  # the blocks as stored, once each
    ratio = packed / sum(stored_bytes(b) for b in ref.transformer_blocks)
    assert ratio < {"F32": 1.01, "F16": 0.51, "BF16": 0.51}.get(qtype, Q.TYPES[qtype].bytes_per_value / 4 + 0.02)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_K", "Q3_K", "Q2_K", "BF16"])
def test_a_lora_on_a_gguf_base_equals_the_lora_on_its_dequantised_base(files, tmp_path, qtype):
    model, ref = load_dit(files[qtype]), twin(files[qtype])
    lora_file = write_lora(tmp_path / "l.safetensors", CFG, "kohya", rank=4, alpha=8.0)
    lora = load_lora(lora_file, model)  # shapes checked against the packed layers' logical shapes
    assert any(model.get_submodule(f.module).quant is not None for f in lora.factors) == (qtype != "BF16")
    with loras_applied(model, [(lora, 0.8)]), loras_applied(ref, [(load_lora(lora_file, ref), 0.8)]):
        diff = max_diff(model, ref)
        assert diff <= 1e-5 and max_diff(ref, twin(files[qtype])) > 1e-3  # the LoRA changes the output
    assert max_diff(model, ref) <= 1e-5  # removed again: the base


def test_every_type_in_one_file_prefixed_as_sd_cpp_writes_it(tmp_path):
    """A file mixing all types layer by layer (as the _K_M files mix Q4_K and Q6_K), with the
    `model.diffusion_model.` prefix and no architecture key (stable-diffusion.cpp's files)."""
    kinds = [t for t in G.TYPES if t != "F32"]
    linears = [k for k, s in D.shapes(CFG).items() if D.is_linear_weight(k, s) and k.startswith("transformer_blocks.")]
    types = {k: kinds[i % len(kinds)] for i, k in enumerate(linears)}
    path = G.write_gguf(tmp_path / "mixed.gguf", CFG, "Q4_K", prefix=D.PREFIX, types=types, arch=None)
    model = load_dit(path)
    assert {model.get_submodule(k.removesuffix(".weight")).weight.dtype for k in linears} == {
        torch.uint8,
        torch.float16,
        torch.bfloat16,
    }
    assert max_diff(model, twin(path)) <= 1e-5


def test_mmap_reshaped_tensors_and_the_2511_marker(tmp_path):
    """mmap=True gives views of the file; a tensor stored reshaped [n / 256, 256] with ComfyUI-GGUF's
    `comfy.gguf.orig_shape` takes its real shape; the `__index_timestep_zero__` tensor switches zero_cond_t on;
    a quantised tensor that is no linear weight (a bias here) is dequantised at load."""
    reshaped = ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.1.attn.to_q.weight")
    types = {"transformer_blocks.0.img_mod.1.bias": "Q8_0"}
    path = G.write_gguf(tmp_path / "x.gguf", CFG, "Q5_K", reshaped=reshaped, types=types, zero_cond_t=True)
    assert G.file_types(path)["transformer_blocks.0.img_mod.1.bias"] == "Q8_0"
    model = load_dit(path, mmap=True)
    assert model.zero_cond_t and model.config.zero_cond_t
    to_q = model.transformer_blocks[1].attn.to_q
    assert to_q.quant.shape == (CFG.hidden, CFG.hidden) and to_q.weight.dtype == torch.uint8
    assert model.transformer_blocks[0].img_mod[1].bias.dtype == torch.float32
    ref = twin(path, G.tiny_config(zero_cond_t=True))
    assert max_diff(model, ref) <= 1e-5


def test_files_of_other_models_and_types_are_named(tmp_path):
    flux = G.write_gguf(tmp_path / "flux.gguf", CFG, "Q8_0", arch="flux")
    with pytest.raises(CheckpointError, match="flux.gguf: this GGUF file holds a Flux diffusion model"):
        load_dit(flux)
    qwen_vl = G.write_gguf(tmp_path / "vl.gguf", CFG, "Q8_0", arch="qwen2vl")
    with pytest.raises(CheckpointError, match="a Qwen2-VL / Qwen2.5-VL language model"):
        load_dit(qwen_vl)
    writer = reference.GGUFWriter(str(tmp_path / "iq.gguf"), arch="qwen_image")  # a type QwenPix does not read
    for name, shape in D.shapes(CFG).items():
        data = D.random_tensor(name, shape, 0).numpy()
        if name == "proj_out.weight":
            raw = np.zeros((shape[0], shape[1] // 32 * 18), np.uint8)
            writer.add_tensor(name, raw, raw_dtype=reference.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match=r"iq.gguf: tensor 'proj_out.weight' is stored as IQ4_NL, which"):
        load_dit(tmp_path / "iq.gguf")
    with pytest.raises(CheckpointError, match="GGUF"):  # the other readers name a GGUF file too
        load_lora(flux, twin(flux))


RSS_CHILD = """
import ctypes, gc, json, sys, torch
ctypes.CDLL(None).mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD fixed: buffers over 64 KiB are mapped and given back
from qwen_image_core.mmdit import load_dit
torch.set_num_threads(1)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def touch(m):  # a forward pass dequantises and uses every weight
    with torch.no_grad():
        m(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), torch.randn(1, 3, m.txt_in.in_features))
touch(load_dit(sys.argv[1]))  # warm-up: kernels, thread pools, lazy imports
gc.collect()
out = {}
for p in sys.argv[1:]:
    before = rss()
    m = load_dit(p)
    touch(m)
    gc.collect()
    out[p] = rss() - before
    del m
    gc.collect()
print(json.dumps(out))
"""


def test_memory_holds_the_packed_file_and_no_more(tmp_path):
    """RSS growth of a fresh process after loading each file (copied into memory) and running every weight: at
    most 1.15x the file (one block of a 1024-wide DiT; random blocks, quick to write)."""
    cfg = G.tiny_config(num_layers=1, num_heads=8, mlp_dim=4096, text_dim=1024)
    paths = [G.write_gguf(tmp_path / f"{t}.gguf", cfg, t, random=True) for t in G.TYPES]
    run = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, *map(str, paths)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    grown = json.loads(run.stdout)
    for p in paths:
        size = p.stat().st_size
        print(f"\n{p.stem}: file {size / 2**20:.1f} MiB, RSS +{grown[str(p)] / 2**20:.1f} MiB")
        assert grown[str(p)] <= 1.15 * size, (p.stem, grown[str(p)], size)
