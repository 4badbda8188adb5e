"""GGUF text encoders (llama.cpp's Qwen2.5-VL layout: a `qwen2vl` language model plus its `mmproj` vision tower,
written by tools/checkpoints/qwen_vl_gguf.py with gguf's own tensor map) against the `gguf` package's reader and
dequantisers and against transformers: for F32 / F16 / Q8_0 / Q4_K the encoder loads packed (the file's blocks,
the token embedding included), encodes text and images as our encoder on gguf's dequantised weights does, and as
transformers where the file is F32; sizes come from the metadata; the mmproj is found as ComfyUI-GGUF finds it;
other files are named."""

from __future__ import annotations

import pytest
import torch

from oracles import image_row, noise_image, oracle_hidden, ours_hidden, pixels
from qwen_image_core import quant_gguf as Q
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.common import assign_weights
from qwen_image_core.ops import Linear
from qwen_image_core.qwen_vl import QwenVL
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import gguf as G
from tools.checkpoints import qwen_vl as W
from tools.checkpoints import qwen_vl_gguf as T

pytestmark = pytest.mark.usefixtures("one_thread")
TYPES = ("F32", "F16", "Q8_0", "Q4_K")
MMPROJ_TYPE = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_K": "F16"}  # as published: mmproj-F16 beside k-quants
TEXT = {"intermediate_size": 256}  # every language-model row splits into k-quant super-blocks (as in the 7B)
STEM = "Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def ref():
    return W.reference_model(seed=0, text=TEXT)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """Per type a folder: `<stem>-<type>.gguf` and `<stem>-mmproj-<type>.gguf` (ComfyUI-GGUF's naming). The Q4_K
    file mixes in Q6_K as Q4_K_M does; the F32 one has no lm_head (as a tied-embedding model)."""
    root = tmp_path_factory.mktemp("te_gguf")
    out = {}
    for q in TYPES:
        mixed = {"blk.1.attn_v.weight": "Q6_K", "output.weight": "Q6_K"} if q == "Q4_K" else {}
        text = T.write_text(root / q / f"{STEM}-{q}.gguf", ref, q, types=mixed, lm_head=q != "F32")
        out[q] = text, T.write_mmproj(root / q / f"{STEM}-mmproj-{MMPROJ_TYPE[q]}.gguf", ref, MMPROJ_TYPE[q])
    return out


def load(path, **kw):
    return load_text_encoder(path, tokenizer=object(), **kw)  # the tokenizer is not used here


def twin(text, mmproj, ref) -> QwenVL:
    """Our encoder on the float32 weights gguf's reader and dequantisers give for the files."""
    model = load(text, mmproj=mmproj).model
    with torch.device("meta"):
        twin = QwenVL(model.cfg)
    return assign_weights(twin, T.reference_weights(text, mmproj, ref), {}, text, "twin").eval()


def inputs():
    pv, grids = pixels([noise_image(150, 220, 5)])
    ids = torch.tensor([image_row(9, [int(grids[0].prod()) // 4], 5, torch.Generator().manual_seed(4))])
    return ids, pv, grids


def gguf_types(text, mmproj, ref) -> dict[str, str]:
    """{legacy weight name: its type in the files} (a joined tensor: its first part's)."""
    sd, types = W.legacy_state_dict(ref), G.file_types(text) | G.file_types(mmproj)
    out = {legacy: types[key] for key, legacy in T.text_names(sd).items() if key in types}
    return out | {legacy: types[keys[0]] for legacy, (keys, _, _) in T.vision_parts(sd).items()}


@pytest.mark.parametrize("qtype", TYPES)
def test_a_gguf_text_encoder_is_packed_and_encodes_as_gguf_s_weights(ref, files, qtype):
    text, mmproj = files[qtype]
    encoder = load(text)  # the mmproj is found next to it, by name
    model = encoder.model
    assert model.visual is not None and encoder.has_vision and model.vision_note is None
    assert model.storage.startswith(f"GGUF {qtype} (") and f"vision tower {mmproj.name}: GGUF" in model.storage
    types = gguf_types(text, mmproj, ref)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear) or name == "model.embed_tokens":
            t = Q.TYPES[types[name + ".weight"]]
            if t.plain is None:  # packed: the file's blocks, dequantised at the cast (or per gathered row)
                assert layer.quant.name == f"gguf {t.name}" and layer.weight.dtype == torch.uint8, name
            else:
                assert layer.quant is None and layer.weight.dtype == t.plain, name
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32  # norms and biases stay F32
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == T.stored_bytes(text, mmproj)

    reference = twin(text, mmproj, ref)
    ids, pv, grids = inputs()
    got = ours_hidden(model, ids, pv, grids)
    diff = float((got - ours_hidden(reference, ids, pv, grids)).abs().max())
    print(f"\n{qtype}: max |ours - our encoder on gguf's dequantised weights| = {diff:.3g}")
    assert diff <= 1e-5
    rows = torch.tensor([[3, 151000, 7], [151668, 0, 3]])
    assert torch.equal(model.model.embed_tokens(rows, torch.float32), reference.model.embed_tokens.weight[rows])
    if qtype == "F32":  # the reference weights exactly: transformers itself
        assert (got - oracle_hidden(ref, ids, torch.ones_like(ids), pv, grids)).abs().max() <= 1e-5


def test_sizes_come_from_the_metadata(tmp_path):
    """64-channel text heads, other M-RoPE sections, theta and eps, 40-channel vision heads and a full-attention
    block every 4th: none of it shows in the shapes (a safetensors file would need a config.json)."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}
    text = {"num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_parameters": rope}
    other = W.reference_model(seed=1, text=text, vision={"num_heads": 4, "fullatt_block_indexes": [3, 7]})
    path = T.write_text(tmp_path / "te-F32.gguf", other, "F32", lm_head=False)
    T.write_mmproj(tmp_path / "te-mmproj-F32.gguf", other, "F32")
    model = load(path).model
    cfg = model.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mrope_section) == (4, 2, 64, (8, 12, 12))
    assert (cfg.rope_theta, cfg.rms_eps) == (1e4, 1e-5)  # float32 metadata read back as the decimal it was
    assert (cfg.vision.num_heads, cfg.vision.full_attention_blocks) == (4, (3, 7))
    ids, pv, grids = inputs()
    expected = oracle_hidden(other, ids, torch.ones_like(ids), pv, grids)
    assert (ours_hidden(model, ids, pv, grids) - expected).abs().max() <= 1e-5
    # other converters (from Ollama's files) write the blocks as a list, and n_wa_pattern as window / patch
    listed = {"clip.vision.fullatt_block_indexes": [3, 7], "clip.vision.n_wa_pattern": 8}
    T.write_mmproj(tmp_path / "te-mmproj-F32.gguf", other, "F32", metadata=listed)
    assert load(path).model.cfg.vision.full_attention_blocks == (3, 7)


def test_the_mmproj_is_found_as_comfyui_gguf_finds_it_or_named(ref, files, tmp_path):
    text, mmproj = files["Q8_0"]
    lone = tmp_path / "lone"
    lone.mkdir()
    alone = lone / text.name
    alone.write_bytes(text.read_bytes())
    no_vision = load(alone)  # nothing next to it: text only, and an edit says what to add
    assert no_vision.model.visual is None and "no vision tower (text-to-image only)" in no_vision.model.storage
    image = noise_image(64, 64, 1)
    hint = rf"text-to-image prompts only; for editing put .*mmproj-F16.gguf.*{STEM}-mmproj-F16.gguf"
    with pytest.raises(ValueError, match=r"no vision tower \(no \*mmproj\*.gguf file lies next to it\).*" + hint):
        no_vision.encode("a cat", [image], "edit")
    assert load(alone, mmproj=mmproj).has_vision  # named explicitly
    (lone / "mmproj-F16.gguf").write_bytes(mmproj.read_bytes())  # unsloth's name, as downloaded
    assert load(alone).has_vision  # the only mmproj in the folder
    assert not load(alone, mmproj=False).has_vision
    (lone / "mmproj-BF16.gguf").write_bytes(mmproj.read_bytes())
    with pytest.raises(ValueError, match=r"2 mmproj files lie next to it \(mmproj-BF16.gguf, mmproj-F16.gguf\)"):
        load(alone).encode("a cat", [image], "edit")
    (lone / "mmproj-BF16.gguf").unlink()
    T.write_mmproj(lone / "mmproj-F16.gguf", ref, "F16", metadata={"clip.projector_type": "qwen3vl_merger"})
    with pytest.warns(UserWarning, match=r"not using mmproj-F16.gguf, the only mmproj file next to it: .*Qwen3-VL"):
        assert not load(alone).has_vision  # a stray vision tower of another model does not stop text-to-image
    named = lone / f"{STEM}-mmproj-F16.gguf"
    (lone / "mmproj-F16.gguf").rename(named)
    with pytest.raises(CheckpointError, match=rf"{named.name}: this mmproj file is the vision tower of Qwen3-VL"):
        load(alone)  # named after it: meant for it, so it must fit


def test_other_files_and_inconsistent_sizes_are_named(ref, files, tmp_path):
    text, mmproj = files["Q8_0"]
    dit = G.write_gguf(tmp_path / "qwen-image-Q8_0.gguf", G.tiny_config(), "Q8_0")
    cases = {
        dit: "holds a Qwen-Image diffusion model \\(DiT\\) .*; load it with the Qwen-Image diffusion model loader",
        T.write_text(tmp_path / "llama.gguf", ref, "F16", arch="llama"): "holds a Llama language model",
        T.write_text(tmp_path / "qwen2.gguf", ref, "F16", arch="qwen2"): "a Qwen2 / Qwen2.5 language model without",
        mmproj: "holds a vision projector \\(mmproj\\).*choose the language-model GGUF",
        T.write_text(tmp_path / "v1.gguf", ref, "F16", name="Qwen2 VL 7B Instruct"): "is Qwen2-VL \\(the first",
    }
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=words):
            load(path)
    wrong = {
        "qwen2vl.feed_forward_length": (512, r"512, but blk.0.ffn_gate.weight is \[256, 256\]"),
        "qwen2vl.attention.head_count_kv": (2, r"2 x head_dim 128 = 256, but blk.0.attn_k.weight is \[128, 256\]"),
        "qwen2vl.block_count": (3, "3, but the file has 2 blk.N blocks"),
        "qwen2vl.rope.dimension_sections": ([16, 24, 16, 0], r"\[16, 24, 16\] does not cover 128-channel heads"),
    }
    for i, (key, (value, words)) in enumerate(wrong.items()):
        path = T.write_text(tmp_path / f"wrong{i}.gguf", ref, "F16", lm_head=False, metadata={key: value})
        with pytest.raises(CheckpointError, match=rf"wrong{i}.gguf: metadata {key} (is )?{words}"):
            load(path, mmproj=False)
    small = T.write_text(tmp_path / "small.gguf", W.reference_model(text={"vocab_size": 1000}), "F16")
    with pytest.raises(CheckpointError, match="token_embd.weight has 1000 rows; the Qwen2.5 tokenizer needs 151669"):
        load(small)
    cut = T.write_mmproj(tmp_path / "cut-mmproj.gguf", ref, "F16", drop=("v.blk.3.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="cut-mmproj.gguf: not a complete .* it lacks v.blk.3.ffn_up.weight"):
        load(text, mmproj=cut)
    other = W.reference_model(text={"hidden_size": 128})
    narrow = T.write_mmproj(tmp_path / "narrow-mmproj.gguf", other, "F16")
    with pytest.raises(CheckpointError, match=r"projects to 128 channels \(clip.vision.projection_dim\), the language"):
        load(text, mmproj=narrow)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_a_packed_gguf_encoder_equals_its_cpu_self(files):
    """The blocks move as they are and are dequantised on the device (the token rows too)."""
    text, _ = files["Q4_K"]
    cpu = load(text).model
    gpu = load(text).model.to("cuda")
    assert gpu.model.embed_tokens.weight.is_cuda and gpu.model.embed_tokens.weight.dtype == torch.uint8
    ids, pv, grids = inputs()
    expected = ours_hidden(cpu, ids, pv, grids)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's conv in float32, as on the CPU
    try:
        got = ours_hidden(gpu, ids.cuda(), pv.cuda(), grids).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert (got - expected).abs().max() <= 1e-4
