"""Qwen3-VL GGUF encoders (Qwen-Image-2.1; llama.cpp's layout: a `qwen3vl` language model plus its `mmproj` vision
tower, written by tools/checkpoints/qwen3_vl_gguf.py with gguf's own tensor maps) against transformers (float32
files: text features, vision features and DeepStack, whole prompts with images) and against our encoder on the
`gguf` package's own dequantised weights (Q8_0 / Q4_K files, loaded packed); sizes from the metadata; the mmproj
found next to it; the Qwen2.5-VL files and the Qwen3-VL ones each refused by the other family's loader."""

from __future__ import annotations

import pytest
import torch

from oracles import noise_image, qwen3_features, qwen3_image_processor, rel_close
from qwen_image_core import quant_gguf as Q
from qwen_image_core.checkpoint import CheckpointError
from qwen_image_core.formats.common import assign_weights
from qwen_image_core.ops import Linear
from qwen_image_core.prompts import IMAGE_PAD, VISION_END, VISION_START, rope_index
from qwen_image_core.qwen21.encoder import load_qwen3_vl
from qwen_image_core.qwen21.qwen3_vl import Qwen3VL
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import gguf as G
from tools.checkpoints import qwen3_vl as W
from tools.checkpoints import qwen3_vl_gguf as T
from tools.checkpoints import qwen_vl as W1
from tools.checkpoints import qwen_vl_gguf as T1

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # max |ours - reference| relative to max |reference|
TYPES = ("F32", "Q8_0", "Q4_K")
MMPROJ_TYPE = {"F32": "F32", "Q8_0": "Q8_0", "Q4_K": "F16"}  # as published: mmproj-F16 beside k-quants
STEM = "Qwen3-VL-8B-Instruct"


@pytest.fixture(scope="module")
def ref():
    return W.reference_model(seed=0)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """Per type a folder: `<stem>-<type>.gguf` and llama.cpp's `mmproj-<stem>-<type>.gguf`; the F32 file has no
    lm_head (as a tied-embedding model), the Q4_K one mixes in Q6_K as Q4_K_M does."""
    root = tmp_path_factory.mktemp("qwen3_gguf")
    out = {}
    for q in TYPES:
        mixed = {"blk.1.attn_v.weight": "Q6_K", "output.weight": "Q6_K"} if q == "Q4_K" else {}
        text = T.write_text(root / q / f"{STEM}-{q}.gguf", ref, q, types=mixed, lm_head=q != "F32")
        out[q] = text, T.write_mmproj(root / q / f"mmproj-{STEM}-{MMPROJ_TYPE[q]}.gguf", ref, MMPROJ_TYPE[q])
    return out


def load(path, **kw):
    return load_qwen3_vl(path, tokenizer=object(), **kw)  # the tokenizer is not used here


def images_and_row(seed: int = 2):
    """Two pictures (landscape, portrait) through the reference processor, and a token row holding both."""
    out = qwen3_image_processor()([noise_image(160, 224, 0), noise_image(96, 64, 1)], return_tensors="pt")
    pv, grids = out["pixel_values"], out["image_grid_thw"]
    row = torch.randint(0, 151000, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    for grid in grids:
        row += [VISION_START] + [IMAGE_PAD] * (int(grid.prod()) // 4) + [VISION_END] + [1, 2, 3]
    return pv, grids, torch.tensor([row])


def features(model: Qwen3VL, pv, grids, ids):
    """(merged, DeepStack, the whole prompt's features) of our encoder."""
    grids = [tuple(g) for g in grids.tolist()]
    with torch.no_grad():
        merged, deepstack = model.encode_images(pv, grids)
        hidden = model(ids, rope_index(ids, grids), torch.float32, (merged, deepstack), ids == IMAGE_PAD)
    return merged, deepstack, hidden


def transformers_features(ref, pv, grids, ids):
    with torch.no_grad():
        theirs = ref.model.get_image_features(pv, grids)
    hidden = qwen3_features(ref, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                            image_grid_thw=grids, mm_token_type_ids=(ids == IMAGE_PAD).int())  # fmt: skip
    return torch.cat(theirs.pooler_output), [torch.cat(d) for d in theirs.deepstack_features], hidden


def twin(text, mmproj, ref) -> Qwen3VL:
    """Our encoder on the float32 weights gguf's reader and dequantisers give for the files."""
    cfg = load(text, mmproj=mmproj).model.cfg
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    return assign_weights(model, T.reference_weights(text, mmproj, ref), {}, text, "twin").eval()


def test_a_float32_gguf_pair_encodes_text_images_and_deepstack_as_transformers(ref, files):
    text, mmproj = files["F32"]
    encoder = load(text)  # the mmproj is found next to it, by name
    model = encoder.model
    assert encoder.has_vision and model.vision_note is None and model.cfg.vision.deepstack_layers == (1, 3)
    assert model.storage == f"GGUF F32 (F32 35); vision tower {mmproj.name}: GGUF F32 (F32 82)"
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == T.stored_bytes(text, mmproj)
    ids = torch.randint(0, 151643, (1, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids, rope_index(ids, []), torch.float32)
    err = rel_close(got, qwen3_features(ref, input_ids=ids, attention_mask=torch.ones_like(ids)), TOL)
    print(f"\ntext features vs transformers: max rel {err:.3g}")
    inputs = images_and_row()
    names = ("merged vision features", "DeepStack 0", "DeepStack 1", "prompt with 2 images")
    ours, theirs = features(model, *inputs), transformers_features(ref, *inputs)
    assert len(ours[1]) == len(theirs[1]) == 2
    for name, a, b in zip(names, [ours[0], *ours[1], ours[2]], [theirs[0], *theirs[1], theirs[2]], strict=True):
        print(f"{name} vs transformers: max rel {rel_close(a, b, TOL):.3g}")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_a_quantised_gguf_pair_is_packed_and_encodes_as_gguf_s_dequantised_weights(ref, files, qtype):
    text, mmproj = files[qtype]
    model = load(text).model
    assert model.storage.startswith(f"GGUF {qtype} (") and f"vision tower {mmproj.name}: GGUF" in model.storage
    sd = W.legacy_state_dict(ref)
    types = G.file_types(text) | G.file_types(mmproj)
    types = {c: types[k] for k, c in T.text_names(sd).items() if k in types} | {
        c: types[keys[0]] for c, (keys, _, _) in T.vision_parts(sd, [1, 3]).items()
    }
    for name, layer in model.named_modules():
        if isinstance(layer, Linear) or name == "model.embed_tokens":
            t = Q.TYPES[types[name + ".weight"]]
            if t.plain is None:  # packed: the file's blocks, dequantised at the cast (or per gathered row)
                assert layer.quant.name == f"gguf {t.name}" and layer.weight.dtype == torch.uint8, name
            else:
                assert layer.quant is None and layer.weight.dtype == t.plain, name
    pos = Q.TYPES[types["visual.pos_embed.weight"]]  # a table read by rows: a quantised one dequantised at load
    assert model.visual.pos_embed.weight.dtype == (pos.plain or torch.float32) and pos.name == MMPROJ_TYPE[qtype]
    reference = twin(text, mmproj, ref)
    inputs = images_and_row()
    ours, theirs = features(model, *inputs), features(reference, *inputs)
    pairs = zip([ours[0], *ours[1], ours[2]], [theirs[0], *theirs[1], theirs[2]], strict=True)
    diffs = [float((a - b).abs().max()) for a, b in pairs]
    print(f"\n{qtype}: max |ours - our encoder on gguf's dequantised weights| (merged, DeepStack, prompt) = {diffs}")
    assert max(diffs) <= 1e-5
    rows = torch.tensor([[3, 151000, 7], [151668, 0, 3]])
    assert torch.equal(model.model.embed_tokens(rows, torch.float32), reference.model.embed_tokens.weight[rows])


def test_sizes_come_from_the_metadata(tmp_path):
    """Other RoPE base, sections and eps, 4 vision heads of 16 and DeepStack at blocks 0, 2, 4: none of it shows
    in the shapes (a safetensors file needs its config); no attention.key_length (the q norm gives the head)."""
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [32, 16, 16], "mrope_interleaved": True}
    other = W.reference_model(seed=1, text={"rms_norm_eps": 1e-5, "rope_parameters": rope},
                              vision={"num_heads": 4, "deepstack_visual_indexes": [0, 2, 4]})  # fmt: skip
    path = T.write_text(tmp_path / "te-F32.gguf", other, "F32", lm_head=False,
                        metadata={"qwen3vl.attention.key_length": None})  # fmt: skip
    T.write_mmproj(tmp_path / "mmproj-te-F32.gguf", other, "F32")
    cfg = load(path).model.cfg
    assert (cfg.rope_theta, cfg.rms_eps, cfg.mrope_section, cfg.head_dim) == (1e4, 1e-5, (32, 16, 16), 128)
    assert (cfg.vision.num_heads, cfg.vision.deepstack_layers) == (4, (0, 2, 4))
    inputs = images_and_row(5)
    for a, b in zip(features(load(path).model, *inputs)[2:], transformers_features(other, *inputs)[2:], strict=True):
        rel_close(a, b, TOL)


def test_the_mmproj_is_found_beside_it_or_named_and_without_it_edits_say_what_to_add(ref, files, tmp_path):
    text, mmproj = files["Q8_0"]
    alone = tmp_path / text.name
    alone.write_bytes(text.read_bytes())
    no_vision = load(alone)
    assert no_vision.model.visual is None and "no vision tower (text-to-image only)" in no_vision.model.storage
    hint = rf"for editing put the Qwen3-VL-8B mmproj GGUF .* or named after it \(e.g. {STEM}-mmproj-F16.gguf\)"
    with pytest.raises(ValueError, match=r"no vision tower \(no \*mmproj\*.gguf file lies next to it\).*" + hint):
        no_vision.encode("a cat", [noise_image(64, 64, 1)])
    assert load(alone, mmproj=mmproj).has_vision and not load(text, mmproj=False).has_vision
    (tmp_path / "mmproj-F16.gguf").write_bytes(mmproj.read_bytes())  # the folder's only mmproj, as downloaded
    assert load(alone).has_vision
    v1 = W1.reference_model(seed=0)
    T1.write_mmproj(tmp_path / "mmproj-F16.gguf", v1, "F16")  # a stray Qwen2.5-VL tower does not stop text
    with pytest.warns(UserWarning, match=r"not using mmproj-F16.gguf, the only mmproj .*vision tower of Qwen2.5-VL"):
        assert not load(alone).has_vision
    with pytest.raises(CheckpointError, match=r"vision tower of Qwen2.5-VL \(Qwen-Image v1's encoder: its language"):
        load(alone, mmproj=tmp_path / "mmproj-F16.gguf")  # named: meant for it, so it must fit


def test_each_family_refuses_the_other_naming_the_right_loader(ref, files, tmp_path):
    text, mmproj = files["Q8_0"]
    v1 = W1.reference_model(seed=0)
    qwen25 = T1.write_text(tmp_path / "Qwen2.5-VL-7B-Instruct-F16.gguf", v1, "F16", lm_head=False)
    with pytest.raises(CheckpointError, match=r"holds the Qwen2.5-VL language model of Qwen-Image v1 .*not the "
                                              r"Qwen3-VL text encoder of Qwen-Image-2.1; load it with 'Load Qwen-Image "
                                              r"Text Encoder'"):  # fmt: skip
        load(qwen25, mmproj=False)
    with pytest.raises(CheckpointError, match=r"holds the Qwen3-VL language model of Qwen-Image-2.1 .*'Load "
                                              r"Qwen-Image-2.1 Text Encoder'"):  # fmt: skip
        load_text_encoder(text, tokenizer=object(), mmproj=False)
    with pytest.raises(CheckpointError, match="this mmproj file is the vision tower of Qwen3-VL"):
        load_text_encoder(qwen25, tokenizer=object(), mmproj=mmproj)
    with pytest.raises(CheckpointError, match=r"holds a vision projector \(mmproj\).*Qwen3-VL language-model GGUF"):
        load(mmproj)
    moe = T.write_text(tmp_path / "moe.gguf", ref, "F16", lm_head=False, arch="qwen3vlmoe")
    with pytest.raises(CheckpointError, match=r"a Qwen3-VL MoE language model .*Qwen3-VL-8B-Instruct"):
        load(moe)


def test_inconsistent_files_and_unread_types_are_named(ref, files, tmp_path):
    text, mmproj = files["Q8_0"]
    wrong_text = {
        "qwen3vl.block_count": (4, "4, but the file has 3 blk.N blocks"),
        "qwen3vl.attention.key_length": (64, r"64, but blk.0.attn_q_norm.weight is \[128\]"),
        "qwen3vl.rope.dimension_sections": ([24, 20, 16, 0], r"\[24, 20, 16\] does not cover 128-channel heads"),
    }
    for i, (key, (value, words)) in enumerate(wrong_text.items()):
        path = T.write_text(tmp_path / f"wrong{i}.gguf", ref, "F16", lm_head=False, metadata={key: value})
        with pytest.raises(CheckpointError, match=rf"wrong{i}.gguf: metadata {key} (is )?{words}"):
            load(path, mmproj=False)
    count = T.write_text(tmp_path / "count.gguf", ref, "F16", lm_head=False, metadata={"qwen3vl.n_deepstack_layers": 3})
    with pytest.raises(CheckpointError, match=r"2 DeepStack mergers, but count.gguf takes 3 \(qwen3vl.n_deep"):
        load(count, mmproj=mmproj)
    flags = {"clip.vision.is_deepstack_layers": [False, True, True, False, False]}
    cases = {
        T.write_mmproj(tmp_path / "flags.gguf", ref, metadata=flags): r"flags blocks \[1, 2\], but the file has "
        r"DeepStack mergers \(v.deepstack.B\) of blocks \[1, 3\]",
        T.write_mmproj(tmp_path / "cut.gguf", ref, drop=("v.deepstack.3.fc2.weight",)): "not a complete Qwen3-VL "
        "mmproj GGUF of 5 blocks: it lacks v.deepstack.3.fc2.weight",
        T.write_mmproj(tmp_path / "size.gguf", ref, metadata={"clip.vision.image_size": 560}): r"image_size is "
        r"560, but the position table \(v.position_embd.weight\) is a 8 x 8 grid of 16-px patches",
        T.write_mmproj(tmp_path / "heads.gguf", ref, metadata={"clip.vision.embedding_length": 96}): r"metadata "
        r"clip.vision.embedding_length is 96, but v.patch_embd.weight is \[64, 3, 16, 16\]",
    }
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=rf"{path.name}: .*{words}"):
            load(text, mmproj=path)
    iq = T.write_text(tmp_path / "iq.gguf", ref, "Q8_0", lm_head=False, types={"blk.0.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(CheckpointError, match=r"iq.gguf: tensor 'blk.0.ffn_up.weight' is stored as IQ4_NL, which "
                                              r"QwenPix does not read \(supported: F32, F16, BF16, Q4_0"):  # fmt: skip
        load(iq, mmproj=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_a_packed_gguf_encoder_equals_its_cpu_self(files):
    """The blocks move as they are and are dequantised on the device (the token rows too)."""
    text, _ = files["Q4_K"]
    cpu = load(text).model
    gpu = load(text).model.to("cuda")
    assert gpu.model.embed_tokens.weight.is_cuda and gpu.model.embed_tokens.weight.dtype == torch.uint8
    pv, grids, ids = images_and_row()
    expected = features(cpu, pv, grids, ids)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's conv in float32, as on the CPU
    try:
        got = features(gpu, pv.cuda(), grids, ids.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for a, b in zip([got[0], *got[1], got[2]], [expected[0], *expected[1], expected[2]], strict=True):
        assert (a.cpu() - b).abs().max() <= 1e-4
