"""The core's progress seam (`qwen_image_core.progress`): a Progress passed as `check` hears step(done, total) after
each text-encoder layer, vision block, VAE tile (or decoder / encoder stage untiled) and, inside `loading`, after
checkpoint tensors; the counts reach their totals, and a check that raises stops the work between two units."""

from __future__ import annotations

import pytest
import torch

from oracles import TOKENIZER
from qwen_image_core.formats.vae import load_vae
from qwen_image_core.progress import LOAD_STEPS, Progress, loading
from qwen_image_core.text_encoder import load_text_encoder
from qwen_image_core.vae import Tiling
from tools.checkpoints.smoke import write_smoke

pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    pass


class Recorder(Progress):
    """Records every step; its check raises Stop at call `at` (never if None)."""

    def __init__(self, at=None):
        super().__init__(self._count, self._record)
        self.at, self.calls, self.steps = at, 0, []

    def _count(self):
        self.calls += 1
        if self.calls == self.at:
            raise Stop

    def _record(self, done, total):
        self.steps.append((done, total))


def runs(total: int) -> list[tuple[int, int]]:
    return [(i, total) for i in range(1, total + 1)]


@pytest.fixture(scope="module")
def te_path(tmp_path_factory):
    return write_smoke("text_encoders", tmp_path_factory.mktemp("te") / "qwen_2.5_vl_7b.safetensors")


@pytest.fixture(scope="module")
def te(te_path):
    return load_text_encoder(te_path, tokenizer=TOKENIZER, cache_size=0)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    return write_smoke("vae", tmp_path_factory.mktemp("vae") / "qwen_image_vae.safetensors")


@pytest.fixture(scope="module")
def vae(vae_path):
    return load_vae(vae_path)


def test_text_encoder_reports_each_block_and_layer(te):
    image = torch.rand(56, 84, 3)
    layers, blocks = len(te.model.model.layers), len(te.model.visual.blocks)
    rec = Recorder()
    reference, _ = te.encode("make it blue", [image], "edit_plus")
    embeds, _ = te.encode("make it blue", [image], "edit_plus", check=rec)
    assert rec.steps == runs(blocks) + runs(layers) and torch.equal(embeds, reference)
    rec = Recorder(at=2)  # text only: stops before the second layer, after one report
    with pytest.raises(Stop):
        te.encode("a cat", check=rec)
    assert layers >= 2 and rec.steps == runs(layers)[:1]
    plain = []  # a plain callable still works as the check; nothing is reported
    te.encode("a cat", check=lambda: plain.append(1))
    assert len(plain) == layers


@pytest.mark.parametrize("tile", [False, Tiling(128, 32)], ids=["one_pass", "tiled"])
def test_vae_reports_each_tile_or_stage(vae, tile):
    latents = torch.randn(1, 16, 40, 40, generator=torch.Generator().manual_seed(0))
    reference = vae.decode(latents, tile=tile)
    rec = Recorder()
    assert torch.equal(vae.decode(latents, tile=tile, check=rec), reference)
    stages = len(vae.decoder.up_blocks)
    assert rec.steps == (runs(9) if tile else runs(stages))  # tiled: 3 x 3 tiles, the stages inside not reported
    # tiled: a check before each tile and each of its stages; call 1 + stages + 1 is before tile 2's first stage
    at = 2 + stages if tile else 3
    rec = Recorder(at=at)
    with pytest.raises(Stop):
        vae.decode(latents, tile=tile, check=rec)
    assert rec.steps == (runs(9)[:1] if tile else runs(stages)[:2])
    rec = Recorder()
    vae.encode(reference[..., :96, :96], tile=tile, check=rec)
    assert rec.steps == (runs(1) if tile else runs(len(vae.encoder.down_blocks)))  # 96 px: one tile


def test_loading_reports_tensors_and_stops(vae_path, te_path):
    rec = Recorder()
    with loading(rec):
        load_vae(vae_path)
    total = rec.steps[-1][1]
    assert rec.steps[-1] == (total, total) and rec.calls >= total  # every tensor read, a check after each read
    assert len(rec.steps) <= LOAD_STEPS + 1 and all(b == total for _, b in rec.steps)
    assert [d for d, _ in rec.steps] == sorted({d for d, _ in rec.steps})  # increasing
    rec = Recorder(at=5)
    with loading(rec), pytest.raises(Stop):  # stops after the 5th tensor of the text encoder
        load_text_encoder(te_path, tokenizer=TOKENIZER, cache_size=0)
    assert rec.calls == 5
    rec = Recorder()
    load_vae(vae_path)  # outside `loading`: no checks, no reports
    assert rec.calls == 0 and rec.steps == []


def test_qwen21_encoder_and_vae_report_too(tmp_path):
    from oracles import noise_image
    from qwen_image_core.formats.vae21 import load_vae21
    from qwen_image_core.qwen21.encoder import load_qwen3_vl
    from tools.checkpoints import qwen3_vl as W
    from tools.checkpoints import vae21 as WV

    path = tmp_path / "qwen3vl_8b_bf16.safetensors"
    W.write_single(path, W.reference_model(seed=0))
    encoder = load_qwen3_vl(path, tokenizer=TOKENIZER)
    layers, blocks = len(encoder.model.model.layers), len(encoder.model.visual.blocks)
    rec = Recorder()
    encoder.encode("make it blue", [noise_image(64, 64, 0)], check=rec)
    assert rec.steps == runs(blocks) + runs(layers)
    rec = Recorder(at=2)
    with pytest.raises(Stop):
        encoder.encode("a cat", check=rec)
    assert rec.steps == runs(layers)[:1]
    vae = load_vae21(WV.write_vae21(tmp_path / "vae", "single", dtype=torch.float32))
    rec = Recorder()
    vae.decode(torch.randn(1, vae.cfg.z_dim, 4, 4, generator=torch.Generator().manual_seed(0)), check=rec)
    assert rec.steps == runs(len(vae.decoder.up_blocks))
    rec = Recorder()
    vae.encode(torch.rand(1, vae.cfg.image_channels, 64, 64) * 2 - 1, check=rec)
    assert rec.steps == runs(len(vae.encoder.down_blocks))
