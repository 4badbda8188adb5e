"""Residency of the Qwen-Image-2.1 condition encoder (Qwen3-VL) inside ComfyUI's real model management (issue 17,
deliverable 4), in process, on test_residency's fake GPU (ComfyUI's own `load_models_gpu` / `free_memory`
unchanged; the device is `meta`, our placements are CPU tensors counted by a Transfer; see that module).

The 2.1 encoder is registered as v1's (`placement.text_encoder_patcher`): its language model layers are planned
resident or streamed within ComfyUI's budget, the vision tower stays with the resident weights, and the 2.1 Encode
node loads it through `load_models_gpu` with the prompt's true token count (text + image slots) as workload.
The 2.1 VAE follows v1's VAE: moved per call (`placement.vae_on_device`), not registered.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_residency import GPU, INFERENCE, RESERVE, block_bytes, fake_gpu, loaded, nbytes, state
from transformers import Qwen2Tokenizer

from oracles import TOKENIZER
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.model_management as mm  # noqa: E402

import_pack()
patcher = importlib.import_module("qwenpix.nodes.patcher")
placement = importlib.import_module("qwenpix.nodes.placement")
nodes21 = importlib.import_module("qwenpix.nodes.qwen21")
qwen3_vl = importlib.import_module("qwenpix.qwen_image_core.qwen21.qwen3_vl")
vision3 = importlib.import_module("qwenpix.qwen_image_core.qwen21.vision3")
encoder21 = importlib.import_module("qwenpix.qwen_image_core.qwen21.encoder")
offload_plan = importlib.import_module("qwenpix.qwen_image_core.offload_plan")

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 6
TOKENS = 40  # the workload the tests plan for


def tiny_qwen3_vl() -> torch.nn.Module:
    """A Qwen3-VL with a small vocabulary, 6 language layers and a 2-block vision tower (DeepStack at both)."""
    vision = vision3.Vision3Config(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=128,
                                   num_position_embeddings=16, deepstack_layers=(0, 1))  # fmt: skip
    cfg = qwen3_vl.Qwen3VLConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=LAYERS,
                                 num_heads=4, num_kv_heads=2, head_dim=32, mrope_section=(4, 6, 6),
                                 vision=vision)  # fmt: skip
    model = qwen3_vl.Qwen3VL(cfg).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl()


def activations(model, tokens: int = TOKENS) -> int:
    cfg = model.cfg
    return offload_plan.text_encoder_activation_bytes(tokens, 1, cfg.hidden_size, cfg.intermediate_size)


def fresh_patcher(model):
    """The registered patcher of `model`, made anew for each test (it is kept on the module)."""
    if hasattr(model, "native_patcher"):
        del model.native_patcher
    return placement.text_encoder_patcher(model)


PATCHES = torch.randn(16, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(6))  # a 4 x 4 patch grid
GRIDS = [(1, 4, 4)]  # -> 4 merged image tokens


def features(model) -> torch.Tensor:
    """The condition features of a prompt with one reference: vision tower, DeepStack, the language layers."""
    ids = torch.arange(12)[None] % 60
    image_mask = torch.zeros(1, 12, dtype=torch.bool)
    image_mask[0, 3:7] = True
    ids[image_mask] = 63
    pos = torch.arange(12).expand(3, 1, 12)
    with torch.inference_mode():
        feats = model.encode_images(PATCHES, GRIDS)
        return model(ids, pos, torch.float32, feats, image_mask)


def forward_watched(model, t) -> tuple[torch.Tensor, list[bool]]:
    """features(model), and for each language layer as it runs whether all its weights lie in `t`'s device memory."""
    seen = []

    def check(module, args):
        seen.append(all(t.on_device(p) for p in module.parameters()))

    hooks = [layer.register_forward_pre_hook(check) for layer in model.model.layers]
    try:
        return features(model), seen
    finally:
        for h in hooks:
            h.remove()


def test_registered_counted_at_its_true_size_and_kept_across_prompts(monkeypatch, model):
    gpu = fake_gpu(monkeypatch, 16 << 20)
    te = fresh_patcher(model)
    assert te is placement.text_encoder_patcher(model) and te.load_device == GPU
    total = nbytes(model.state_dict().values())
    assert placement.load_text_encoder(te, 1, TOKENS).type == "cpu"  # the stand-in device computes on the CPU
    t = gpu.transfers[0]
    assert te.model.tokens == TOKENS  # the prompt's token count is the planned workload
    assert loaded() == [te] and t.uploaded == total == t.allocated == te.placement.placed_bytes
    assert te.loaded_size() == te.placement.held >= total  # ComfyUI counts the true size
    assert state(te) == (tuple(range(LAYERS)), ())
    assert all(t.on_device(p) for p in model.visual.parameters())  # the vision tower resident
    placement.load_text_encoder(te, 1, TOKENS)  # the next prompt's encode: nothing moves
    assert t.uploaded == total and loaded() == [te]
    te.detach(unpatch_all=True)
    mm.current_loaded_models.clear()


def test_at_80_percent_some_layers_stream_and_the_features_are_bit_equal(monkeypatch, model):
    reference = features(model)  # the CPU run, unplaced
    total = nbytes(model.state_dict().values())
    budget = int(0.8 * total) + activations(model) + INFERENCE + RESERVE
    gpu = fake_gpu(monkeypatch, budget)
    te = fresh_patcher(model)
    placement.load_text_encoder(te, 1, TOKENS)
    t = gpu.transfers[0]
    resident, streamed = state(te)
    assert resident and streamed and loaded() == [te]  # some layers stream
    layers = model.model.layers
    assert t.uploaded == total - block_bytes(layers, streamed) == te.placement.placed_bytes
    assert all(t.on_device(p) for p in model.visual.parameters())  # the vision tower stays resident
    assert gpu.held() <= budget and te.loaded_size() == te.placement.held < total
    before = t.streamed
    out, on_device = forward_watched(model, t)
    assert on_device == [True] * LAYERS and torch.equal(out, reference)  # streamed = unplaced, bit for bit
    packed = te.placement.offloaded.streamer._packed
    assert t.streamed - before == sum(packed[i].nbytes for i in streamed)  # each streamed layer crossed once
    te.detach(unpatch_all=True)
    mm.current_loaded_models.clear()


def test_a_native_model_needing_the_room_unloads_it_and_the_next_encode_re_places_it(monkeypatch, model):
    reference = features(model)
    budget = 16 << 20
    gpu = fake_gpu(monkeypatch, budget)
    te = fresh_patcher(model)
    placement.load_text_encoder(te, 1, TOKENS)
    t, total = gpu.transfers[0], nbytes(model.state_dict().values())
    native = gpu.native(budget - INFERENCE - (64 << 10))  # fits alone, not beside the encoder
    mm.load_models_gpu([native])
    assert loaded() == [native] and t.allocated == 0 and te.loaded_size() == 0 and state(te) == ((), ())
    assert all(not t.on_device(p) for p in model.parameters())  # back on the host copies
    placement.load_text_encoder(te, 1, TOKENS)  # the next encode: ComfyUI evicts the native model in turn
    assert loaded() == [te] and native.loaded_size() == 0 and t.uploaded == 2 * total == te.placement.placed_bytes
    assert torch.equal(features(model), reference)
    te.detach(unpatch_all=True)
    mm.current_loaded_models.clear()


def test_the_encode_node_plans_for_the_prompts_true_token_count(monkeypatch, model):
    """Encode's load: the workload is the longest row (template + text + the references' merged vision tokens)."""
    gpu = fake_gpu(monkeypatch, 16 << 20)
    enc = encoder21.Qwen3VLEncoder(model, Qwen2Tokenizer.from_pretrained(str(TOKENIZER)), "tiny")
    te = fresh_patcher(model)
    picture = torch.rand(64, 96, 3)  # a 64 x 96 reference (the processor scales small pictures up)
    texts = ("a red cube on <image1>", "")
    tokens = nodes21.prompt_tokens(enc, texts, [picture])
    assert encoder21.vision_patches21(picture)[1] == (1, 14, 20)  # 224 x 320 pixels in 16 px patches
    slots = 14 * 20 // 4  # 2 x 2 patches merged per image slot
    text_only = max(len(enc.tokenizer(encoder21.template_text(p, 1))["input_ids"]) for p in texts)
    assert tokens == text_only - 1 + slots  # the one <|image_pad|> expanded to the slots
    assert nodes21.load_encoder(enc, texts, [picture]).type == "cpu"
    assert te.model.tokens == tokens and loaded() == [te] and gpu.transfers[0].uploaded > 0
    name = te.placement.offloaded.plan.name
    assert f"text encoder {tokens} tokens" in name
    te.detach(unpatch_all=True)
    mm.current_loaded_models.clear()


def test_the_21_samplers_dit_is_loaded_by_comfyui_and_streams_bit_equal(monkeypatch, tmp_path):
    """The 2.1 Sampler's DiT goes through the loader's registered patcher (`qwen21_model.load_for_run`): ComfyUI's
    load_models_gpu gives it a budget, the blocks that do not fit stream, and a CFG run of the core sampler on the
    placed DiT equals the unplaced run bit for bit, every block computing from device memory."""
    from tools.checkpoints import dit21 as W21

    model21 = importlib.import_module("qwenpix.nodes.qwen21_model")
    pipeline21 = importlib.import_module("qwenpix.qwen_image_core.qwen21.pipeline")
    dit21 = importlib.import_module("qwenpix.qwen_image_core.qwen21.dit")
    sampler21 = importlib.import_module("qwenpix.qwen_image_core.qwen21.sampler")
    cfg = W21.tiny_config(num_layers=4)
    dit = dit21.load_dit21(W21.write_comfy(tmp_path / "dit21.safetensors", cfg, dtype=torch.float32))
    g = torch.Generator().manual_seed(3)
    pos = sampler21.Condition21(torch.randn(1, 10, cfg.text_dim, generator=g))
    neg = sampler21.Condition21(torch.randn(1, 6, cfg.text_dim, generator=g))
    noise = torch.randn(1, cfg.in_channels, 4, 6, generator=g)
    sig = torch.tensor([1.0, 0.6, 0.2, 0.0])
    parts = nodes21._Parts(torch.device("cpu"), dit=dit)

    def run():
        with torch.inference_mode():
            return pipeline21.QwenImage21Pipeline.sample(parts, noise, sig, pos, neg, 2.0, torch.float32)

    reference = run()
    size = nbytes(dit.state_dict().values())
    fake = fake_gpu(monkeypatch, size * 4 // 5 + 3 * INFERENCE + RESERVE)  # ~80 %: 1 of 4 blocks resident
    device = model21.load_for_run(dit, torch.float32, noise.shape, pos, cfg=True)
    (base,) = loaded()
    resident, streamed = state(base)
    print(f"\n2.1 DiT {size} bytes on {device}: {base.placement.last_plan}")
    assert device == GPU and streamed and resident and fake.held() <= fake.budget
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(all(fake.transfers[-1].on_device(p) for p in
             m.parameters()))) for b in dit.transformer_blocks]  # fmt: skip
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, reference) and seen and all(seen)
