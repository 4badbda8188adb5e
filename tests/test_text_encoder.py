"""TextEncoder.encode against diffusers' encode_prompt of the three Qwen-Image pipelines.

Oracle: diffusers 0.42.1 pipelines with the real Qwen2.5 tokenizer, transformers 5.23's PIL image
processor, and a tiny random `Qwen2_5_VLForConditionalGeneration` as text encoder. diffusers' edit
pipelines do not pass `mm_token_type_ids`, without which transformers 5.x gives image tokens 1D
positions; the oracle subclass below passes it (image tokens = 1), so the oracle uses the 3D M-RoPE
positions that transformers 4.x and ComfyUI compute. Processor: transformers' `Qwen2VLProcessor` minus
its video-processor type check (torchvision is not installed).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
)
from PIL import Image
from transformers import Qwen2Tokenizer

import oracles
from oracles import TOKENIZER, VLOracle
from qwen_image_core.prompts import resize_for_edit
from qwen_image_core.text_encoder import load_text_encoder
from tools.checkpoints import qwen_vl as W

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

ATOL = 1e-5


@pytest.fixture(scope="module")
def oracle():
    return W.reference_model(seed=0, cls=VLOracle)


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def pipes(oracle, tok):
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None, text_encoder=oracle, tokenizer=tok
    )
    processor = oracles.processor(tok)
    return {
        "t2i": QwenImagePipeline(**parts),
        "edit": QwenImageEditPipeline(**parts, processor=processor),
        "edit_plus": QwenImageEditPlusPipeline(**parts, processor=processor),
    }


@pytest.fixture(scope="module")
def comfy_file(oracle, tmp_path_factory):
    path = tmp_path_factory.mktemp("te") / "qwen_2.5_vl_7b.safetensors"
    return W.write_comfy_single(path, W.legacy_state_dict(oracle), lm_head=False)


@pytest.fixture(scope="module")
def te(comfy_file):
    return load_text_encoder(comfy_file, tokenizer=TOKENIZER)


def noise(h, w, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def reference(pipe, prompts, **kw):
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, device="cpu", **kw)
    mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return embeds, mask


def check(ours, ref):
    (e, m), (re, rm) = ours, ref
    assert e.shape == re.shape and torch.equal(m, rm)
    assert m.dtype == torch.bool and (e[~m] == 0).all()
    assert (e - re).abs().max() <= ATOL


def test_text_to_image_matches_diffusers(te, pipes):
    prompts = ["a cat", "A red fox on a snowy hill at dawn, watercolour, 雪"]
    check(te.encode(prompts, max_sequence_length=1024), reference(pipes["t2i"], prompts, max_sequence_length=1024))
    assert te.encode("a cat")[0].shape[1] == 7


def test_long_prompt_truncated_with_warning(te, pipes):
    prompt = "very long prompt " * 200  # 600 tokens
    with pytest.warns(UserWarning, match="only the first 512"):
        ours = te.encode(prompt)
    check(ours, reference(pipes["t2i"], prompt, max_sequence_length=512))
    with pytest.warns(UserWarning, match="exceeds the reference limit"):
        te.encode("a cat", max_sequence_length=4096)


def test_edit_matches_diffusers(te, pipes):
    vl, _ = resize_for_edit(noise(120, 180, 0), "edit")  # the pipeline's own resize, to ~1024^2
    vl = vl.resize((230, 150))  # keep the tiny test fast: the VL copy the encoder receives is any image
    check(
        te.encode("make the sky green", images=vl, template="edit"),
        reference(pipes["edit"], "make the sky green", image=vl),
    )


def test_edit_plus_three_images_matches_diffusers(te, pipes):
    sizes = [(300, 200), (120, 240), (90, 90)]
    images = [resize_for_edit(noise(h, w, i), "edit_plus")[0] for i, (h, w) in enumerate(sizes)]
    prompt = "put the cat from picture 1 on the sofa of picture 2 under the lamp of picture 3"
    ours = te.encode(prompt, images=images, template="edit_plus")
    check(ours, reference(pipes["edit_plus"], prompt, image=images))
    assert ours[0].shape[1] > 3 * 150  # all images' tokens are in the kept sequence
    with pytest.raises(ValueError, match=re.escape("extra <|image_pad|>")):
        te.encode("<|image_pad|> here", images=images[:1], template="edit_plus")


def test_fp8_scaled_file_matches_diffusers_on_dequantised_weights(oracle, pipes, tmp_path):
    sd = {k: v for k, v in W.legacy_state_dict(oracle).items() if not k.startswith("lm_head")}
    deq = W.write_comfy_fp8_scaled(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", sd)
    te8 = load_text_encoder(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", tokenizer=TOKENIZER)
    deq_oracle = copy.deepcopy(oracle)
    deq_oracle.load_state_dict(W.to_transformers5_names(deq), strict=False)
    pipe = copy.copy(pipes["edit_plus"])
    pipe.text_encoder = deq_oracle
    images = [noise(100, 140, 7)]
    check(te8.encode("a blue door", images=images, template="edit_plus"), reference(pipe, "a blue door", image=images))


def test_cache_skips_the_model(te):
    calls = []
    hook = te.model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        te.clear_cache()
        first = te.encode(["a cat", "a dog"])
        second = te.encode(["a dog", "a cat"])
        assert len(calls) == 1 and torch.equal(first[0][0], second[0][1])
        te.encode(["a dog", "a bird"])  # only the new prompt runs
        te.encode("a cat", images=[noise(64, 64, 0)], template="edit")
        te.encode("a cat", images=[noise(64, 64, 1)], template="edit")  # other image: a new entry
        assert len(calls) == 4
    finally:
        hook.remove()
    te.cache_size = 2
    te.encode(["p1", "p2", "p3"])
    assert len(te._cache) == 2


def test_the_negative_prompt_of_an_edit_reuses_the_vision_features(te):
    """A second prompt on the same pictures (an edit's negative, another node) runs the language model only; its
    embeddings equal those of both prompts encoded together and each alone from an empty cache."""
    te.clear_cache()
    pictures = [noise(64, 64, 2), noise(48, 80, 3)]
    vision = []
    hook = te.model.visual.register_forward_hook(lambda *a: vision.append(1))
    try:
        pos = te.encode("put the cat of Picture 2 in Picture 1", images=pictures, template="edit_plus")
        neg = te.encode(" ", images=pictures, template="edit_plus")
        assert len(vision) == 1  # the negative's pictures came from the vision cache
        te.encode(" ", images=pictures[:1], template="edit_plus")  # other pictures: the tower runs
        assert len(vision) == 2
    finally:
        hook.remove()
    for text, got in (("put the cat of Picture 2 in Picture 1", pos), (" ", neg)):
        te.clear_cache()
        alone = te.encode(text, images=pictures, template="edit_plus")
        assert torch.equal(alone[0], got[0]) and torch.equal(alone[1], got[1])


def test_bf16_compute_runs_close_to_fp32(te):
    """The compute dtype comes from the call (bf16 on GPUs); weights stay as stored."""
    image = [noise(80, 120, 3)]
    e32, m32 = te.encode("a red door", images=image, template="edit_plus")
    e16, m16 = te.encode("a red door", images=image, template="edit_plus", dtype=torch.bfloat16)
    assert e16.dtype == torch.bfloat16 and torch.equal(m16, m32)
    assert (e16.float() - e32).abs().max() < 0.1 * e32.abs().max()


def test_edit_truncation_keeps_the_leading_rows(te):
    """With images the full sequence runs and the kept rows are cut afterwards (same rows: causal model)."""
    image = [noise(60, 90, 4)]
    full, _ = te.encode("a long instruction " * 20, images=image, template="edit_plus")
    with pytest.warns(UserWarning, match="only the first 50"):
        cut, mask = te.encode("a long instruction " * 20, images=image, template="edit_plus", max_sequence_length=50)
    assert cut.shape[1] == 50 and mask.all() and torch.equal(cut[0], full[0, :50])
