"""Templates, tokenizer discovery, image preprocessing, edit resizes and M-RoPE positions.

References: the real Qwen2.5 tokenizer bundled with ComfyUI, transformers 5.23's
`Qwen2VLImageProcessorPil` and `Qwen2_5_VLModel.get_rope_index` (given `mm_token_type_ids`, the
argument transformers 5.x needs to compute 3D positions at all).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen_image_core import prompts as P
from tools.checkpoints import qwen_vl as W
from tools.comfy_paths import comfyui_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

TOKENIZER = comfyui_dir() / "comfy" / "text_encoders" / "qwen25_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return P.load_tokenizer(TOKENIZER)


def noise(h, w, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_template_prefixes_and_suffix(tok):
    for name, t in P.TEMPLATES.items():
        prefix = t.text.split("{}")[0]
        if t.images == "one":
            prefix = prefix.replace(P.IMAGE_SLOT, "")
        assert len(tok(prefix)["input_ids"]) == t.drop, name
    ids = tok(P.template_text("t2i", "a cat", 0))["input_ids"]
    assert len(ids) == 41 and ids[34:][-5:] == [151645, 198, 151644, 77091, 198]
    edit = tok(P.template_text("edit", "x", 1))["input_ids"]
    assert edit[64:67] == [P.VISION_START, P.IMAGE_PAD, P.VISION_END]
    plus = tok(P.template_text("edit_plus", "x", 2))["input_ids"]
    assert plus[64:72] == [24669, 220, 16, 25, 220, P.VISION_START, P.IMAGE_PAD, P.VISION_END]
    assert plus.count(P.IMAGE_PAD) == 2
    with pytest.raises(ValueError, match="exactly one image"):
        P.template_text("edit", "x", 2)
    with pytest.raises(ValueError, match="takes no images"):
        P.template_text("t2i", "x", 1)


def test_find_tokenizer(tmp_path, monkeypatch):
    assert P.find_tokenizer(TOKENIZER) == TOKENIZER.resolve()
    root = comfyui_dir()
    assert P.find_tokenizer(root) == TOKENIZER.resolve()  # ComfyUI's folder
    assert P.find_tokenizer(root / "comfy") == TOKENIZER.resolve()  # its comfy package
    repo = tmp_path / "Qwen-Image"
    (repo / "tokenizer").mkdir(parents=True)
    (repo / "text_encoder").mkdir()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (repo / "tokenizer" / f).symlink_to(TOKENIZER / f)
    assert P.find_tokenizer(repo) == (repo / "tokenizer").resolve()  # a diffusers repo
    assert P.find_tokenizer(None, search=[repo / "text_encoder"]) == (repo / "tokenizer").resolve()
    with pytest.raises(FileNotFoundError, match="pass its folder explicitly"):
        P.find_tokenizer(tmp_path / "nothing")
    # inside ComfyUI the `comfy` package is importable: found without importing it
    monkeypatch.setattr(
        P.importlib.util,
        "find_spec",
        lambda name: types.SimpleNamespace(submodule_search_locations=[str(root / "comfy")]),
    )
    assert P.find_tokenizer(None, search=[tmp_path]) == TOKENIZER.resolve()


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1024, 1024), (1036, 1036)), ((750, 1000), (756, 1008)), ((1080, 1920), (1092, 1932)), ((30, 40), (56, 84))],
)
def test_smart_resize(size, expected):
    assert P.smart_resize(*size) == expected


def test_smart_resize_max_pixels():
    h, w = P.smart_resize(4000, 6000, max_pixels=1003520)
    assert h * w <= 1003520 and h % 28 == 0 and w % 28 == 0


@pytest.mark.parametrize(("h", "w"), [(150, 220), (391, 257)])
def test_vision_patches_equal_transformers_processor(h, w):
    img = noise(h, w, 1)
    ref = Qwen2VLImageProcessorPil(min_pixels=P.MIN_PIXELS, max_pixels=P.MAX_PIXELS)(img, return_tensors="pt")
    patches, grid = P.vision_patches(img)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert torch.equal(patches, ref["pixel_values"])
    as_tensor = torch.from_numpy(np.array(img)).float() / 255  # ComfyUI IMAGE layout [H, W, C] in [0, 1]
    assert torch.equal(P.vision_patches(as_tensor[None])[0], ref["pixel_values"])


def test_edit_resize_policies():
    img = noise(750, 1000)
    vl, vae = P.resize_for_edit(img, "edit")
    assert vl is vae and vae.size == (1184, 896)
    vl, vae = P.resize_for_edit(img, "edit_plus")
    assert vl.size == (448, 320) and vae.size == (1184, 896)
    assert P.smart_resize(vl.height, vl.width) == (308, 448)  # 176 image tokens, as in the reference table
    assert P.calculate_dimensions(1024 * 1024, 1920 / 1080) == (1376, 768)
    vl, vae = P.resize_for_edit(noise(517, 803), "keep")
    assert vae.size == (800, 512) and vl.size == P.calculate_dimensions(384 * 384, 803 / 517)
    assert np.array_equal(np.asarray(vae), np.asarray(noise(517, 803))[:512, :800])  # no resampling, no shift


def test_rope_index_matches_transformers():
    """Two right-padded rows holding the same two images, against get_rope_index given mm_token_type_ids."""
    from transformers import Qwen2_5_VLModel

    grids = [(1, 4, 8), (1, 6, 4)]
    counts = [t * h * w // 4 for t, h, w in grids]
    g = torch.Generator().manual_seed(0)

    def row(n_text):
        r = torch.randint(0, 1000, (n_text,), generator=g).tolist()
        for n in counts:
            r += [P.VISION_START] + [P.IMAGE_PAD] * n + [P.VISION_END] + [5, 6]
        return r

    rows = [row(64), row(9)]
    n = max(map(len, rows))
    ids = torch.tensor([r + [P.PAD] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    ours = P.rope_index(ids, grids)
    # get_rope_index only reads `config` and calls `get_vision_position_ids`: run it on a stand-in
    fake = types.SimpleNamespace(config=W.reference_config())
    fake.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(fake, *a, **k)
    ref, _ = Qwen2_5_VLModel.get_rope_index(
        fake, ids, (ids == P.IMAGE_PAD).int(), image_grid_thw=torch.tensor(grids * 2), attention_mask=mask
    )
    valid = mask.bool()
    assert torch.equal(ours[:, valid], ref[:, valid])
    # the worked example: <|vision_start|> at 64, a 4 x 8 patch image (2 x 4 merged tokens)
    assert ours[:, 0, 65].tolist() == [65, 65, 65] and ours[:, 0, 72].tolist() == [65, 66, 68]
    assert ours[:, 0, 73].tolist() == [69, 69, 69]
