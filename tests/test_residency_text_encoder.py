"""Residency of the Qwen2.5-VL text encoder inside ComfyUI's real model management, on test_residency's fake GPU:
registered at its true size, evicted by a native model that needs the room and re-placed, sharing the device
with the DiT."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_residency import BUDGET, GPU, INFERENCE, dit, dit_file, gpu, loaded, nbytes, prompt, state  # noqa: F401 (fixtures)

from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.model_management as mm  # noqa: E402

import_pack()
native_model = importlib.import_module("qwenpix.nodes.native_model")
placement = importlib.import_module("qwenpix.nodes.placement")
qwen_vl = importlib.import_module("qwenpix.qwen_image_core.qwen_vl")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_encoder():
    cfg = qwen_vl.QwenVLConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=2,
                               num_kv_heads=1, head_dim=32, mrope_section=(4, 6, 6), vision=None)  # fmt: skip
    enc = qwen_vl.QwenVL(cfg).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(4)
    for p in enc.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return enc


def test_the_text_encoder_is_registered_evicted_and_re_placed_the_same_way(gpu):  # noqa: F811 (the fixture)
    enc = tiny_encoder()
    te = placement.text_encoder_patcher(enc)
    assert te is placement.text_encoder_patcher(enc) and te.load_device == GPU
    ids = torch.arange(10)[None] % 64
    pos = torch.arange(10).expand(3, 1, 10)
    with torch.inference_mode():
        reference = enc(ids, pos)
    total = nbytes(enc.state_dict().values())
    assert placement.load_text_encoder(te, 0).type == "cpu"  # the stand-in device computes on the CPU
    t = gpu.transfers[0]
    assert loaded() == [te] and t.uploaded == total == t.allocated and te.loaded_size() == te.placement.held
    placement.load_text_encoder(te, 0)  # the next prompt's encode
    assert t.uploaded == total and loaded() == [te]

    native = gpu.native(BUDGET - INFERENCE - (64 << 10))
    mm.load_models_gpu([native])
    assert loaded() == [native] and t.allocated == 0 and te.loaded_size() == 0
    placement.load_text_encoder(te, 1)  # an edit prompt: re-placed, the native model evicted
    assert loaded() == [te] and native.loaded_size() == 0 and t.uploaded == 2 * total == te.placement.placed_bytes
    with torch.inference_mode():
        assert torch.equal(enc(ids, pos), reference)


def test_the_dit_and_the_text_encoder_share_the_device(gpu, dit):  # noqa: F811 (the fixtures)
    enc = tiny_encoder()
    te = placement.text_encoder_patcher(enc)
    placement.load_text_encoder(te, 0)
    m = native_model.dit_model(dit, torch.float32)
    prompt(m)
    t_te, t_dit = gpu.transfers
    assert set(loaded()) == {m, te}  # both fit: both stay
    te_bytes, dit_bytes = t_te.allocated, t_dit.allocated
    assert (te_bytes, dit_bytes) == (nbytes(enc.state_dict().values()), nbytes(dit.state_dict().values()))
    prompt(m, BUDGET - dit_bytes - te_bytes // 2)  # a larger image: the DiT needs the encoder's room
    assert loaded() == [m] and t_te.allocated == 0 and te.loaded_size() == 0  # ComfyUI evicted the encoder
    assert t_dit.uploaded == dit_bytes and state(m)[1] == ()  # the DiT stayed as it was
