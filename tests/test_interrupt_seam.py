"""The core's interrupt seam: `check` is called between text-encoder layers, vision blocks, VAE tiles and VAE stages;
whatever it raises stops the work there, and the next call computes exactly what an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from oracles import TOKENIZER
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.text_encoder import load_text_encoder
from qwen_image_core.vae import Tiling
from tools.checkpoints.smoke import write_smoke

pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    pass


class Check:
    """Counts its calls; raises Stop at call `at` (never if None)."""

    def __init__(self, at=None):
        self.at, self.calls = at, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.at:
            raise Stop


@pytest.fixture(scope="module")
def te(tmp_path_factory):
    path = write_smoke("text_encoders", tmp_path_factory.mktemp("te") / "qwen_2.5_vl_7b.safetensors")
    return load_text_encoder(path, tokenizer=TOKENIZER, cache_size=0)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return load_vae(write_smoke("vae", tmp_path_factory.mktemp("vae") / "qwen_image_vae.safetensors"))


class Calls:
    """Counts forward calls of modules while in a with block."""

    def __init__(self, modules):
        self.modules, self.n = modules, 0

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def _hook(self, *_):
        self.n += 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_text_encoder_checks_between_layers_and_blocks(te):
    image = torch.rand(56, 84, 3)
    reference, _ = te.encode("make it blue", [image], "edit_plus")
    layers, blocks = len(te.model.model.layers), len(te.model.visual.blocks)
    every = Check()
    embeds, _ = te.encode("make it blue", [image], "edit_plus", check=every)
    assert every.calls == blocks + layers and torch.equal(embeds, reference)
    with Calls(te.model.model.layers) as ran, pytest.raises(Stop):
        te.encode("make it blue", [image], "edit_plus", check=Check(at=blocks + 1))  # before the first layer
    assert ran.n == 0
    with Calls(te.model.model.layers) as ran, pytest.raises(Stop):
        te.encode("a cat", check=Check(at=2))  # text only: before the second layer
    assert ran.n == 1
    again, _ = te.encode("make it blue", [image], "edit_plus")
    assert torch.equal(again, reference)


@pytest.mark.parametrize("tile", [False, Tiling(128, 32)], ids=["one_pass", "tiled"])
def test_vae_checks_between_stages_and_tiles(vae, tile):
    latents = torch.randn(1, 16, 40, 40, generator=torch.Generator().manual_seed(0))
    reference = vae.decode(latents, tile=tile)
    every = Check()
    assert torch.equal(vae.decode(latents, tile=tile, check=every), reference)
    stages = len(vae.decoder.up_blocks)
    # tiled: 40 latents = 320 px in 128 px tiles overlapping by 32 = 3 x 3 tiles, a call before each and its stages
    assert every.calls == (9 * (1 + stages) if tile else stages)
    with Calls([vae.decoder]) as ran, pytest.raises(Stop):
        vae.decode(latents, tile=tile, check=Check(at=2))  # tiled: inside tile 1; one pass: before stage 2
    assert ran.n == 1
    assert torch.equal(vae.decode(latents, tile=tile), reference)
    image = reference[..., :96, :96]
    expected = vae.encode(image, tile=tile)
    every = Check()
    assert torch.equal(vae.encode(image, tile=tile, check=every), expected) and every.calls > 1
    with pytest.raises(Stop):
        vae.encode(image, tile=tile, check=Check(at=1))
