"""The Qwen-Image-2.1 pipelines (`qwen21.pipeline`) against diffusers 0.42.1's modular `qwenimage21` blocks.

Oracle: `QwenImage21AutoBlocks` (text encoder, VAE encoder, denoise with the ClassifierFreeGuidance guider,
decode) on tiny random models in float32: transformers' Qwen3-VL (`tools/checkpoints/qwen3_vl.py`), diffusers'
QwenImage21Transformer2DModel and AutoencoderKLQwenImage21 with the weights ours load. Per-step velocities:
the guided prediction diffusers hands its scheduler, recorded by a scheduler subclass; ours from the step
callback (v = (x - denoised) / sigma). Pixel-exact edits are checked by construction: an identity-like VAE
(16x space-to-channel) and a DiT whose prediction lands exactly on image_1's latent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Qwen2Tokenizer

from oracles import QWEN_SCHEDULER, TOKENIZER, diffusers_dit21, noise_image, qwen3_processor, rel_close
from qwen_image_core.formats.vae21 import load_vae21
from qwen_image_core.mmdit import MMDiT
from qwen_image_core.pipeline import QwenImagePipeline
from qwen_image_core.qwen21 import DiT21
from qwen_image_core.qwen21.encoder import load_qwen3_vl
from qwen_image_core.qwen21.pipeline import QwenImage21Pipeline, make_sigmas
from qwen_image_core.qwen21.schedule import TURBO_SIGMAS, turbo_sigmas
from qwen_image_core.qwen21.vae import ImageVAE21, VAE21Config
from qwen_image_core.text_encoder import TextEncoder
from qwen_image_core.vae import ImageVAE, VAEConfig
from tools.checkpoints import dit as WD1
from tools.checkpoints import dit21 as WD
from tools.checkpoints import qwen3_vl as WQ
from tools.checkpoints import vae21 as WV

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

TOL = 1e-4  # images and velocities: max |ours - reference| relative to max |reference|
STEPS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline21")
    tok = Qwen2Tokenizer.from_pretrained(str(TOKENIZER))
    te = WQ.reference_model(seed=0)
    encoder = load_qwen3_vl(WQ.write_single(d / "qwen3vl.safetensors", te), tokenizer=tok)
    cfg = WD.tiny_config(text_dim=te.config.text_config.hidden_size)
    sd = WD.state_dict(cfg)
    dit = DiT21(cfg)
    dit.load_state_dict(sd)
    dit.eval()
    vae = load_vae21(WV.write_vae21(d / "vae", "diffusers", dtype=torch.float32))
    return dict(tok=tok, te=te, encoder=encoder, cfg=cfg, sd=sd, dit=dit, vae=vae)


class RecordingScheduler:
    """Builds diffusers' scheduler with a step() that records the velocity it is handed."""

    @staticmethod
    def make(record: list):
        from diffusers import FlowMatchEulerDiscreteScheduler

        class Recording(FlowMatchEulerDiscreteScheduler):
            def step(self, model_output, *args, **kwargs):
                record.append(model_output.detach().clone())
                return super().step(model_output, *args, **kwargs)

        return Recording(**QWEN_SCHEDULER)


def reference_pipeline(m, cfg_scale: float, record: list):
    from diffusers import AutoencoderKLQwenImage21
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines import QwenImage21AutoBlocks

    vae = AutoencoderKLQwenImage21(**WV.diffusers_config(m["vae"].cfg)).eval()
    vae.load_state_dict(WV.random_weights(m["vae"].cfg), strict=True)  # the float32 file ours loads
    pipe = QwenImage21AutoBlocks().init_pipeline()
    pipe.update_components(
        text_encoder=m["te"], processor=qwen3_processor(m["tok"]), vae=vae,
        transformer=diffusers_dit21(m["cfg"], m["sd"]),
        scheduler=RecordingScheduler.make(record), guider=ClassifierFreeGuidance(guidance_scale=cfg_scale),
        image_processor=VaeImageProcessor(vae_scale_factor=16),
    )  # fmt: skip
    return pipe


def ours_recording(record: list):
    def callback(i, n, x, denoised):
        record.append((x, denoised))

    return callback


def velocities(steps, sigmas):
    return [(x - d) / float(s) for (x, d), s in zip(steps, sigmas[:-1], strict=True)]


def packed(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(2).transpose(1, 2)  # [B, 64, h, w] -> diffusers' [B, h*w, 64]


def test_text_to_image_with_cfg_matches_diffusers(models):
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    theirs_v, ours_steps = [], []
    ref = reference_pipeline(models, 4.0, theirs_v)
    kw = dict(height=64, width=96, generator=torch.Generator().manual_seed(7), output="images", output_type="pt")
    with torch.no_grad():
        expected = ref(prompt="a red fox", negative_prompt="blurry", num_inference_steps=STEPS, **kw)
    got = pipe.generate("a red fox", "blurry", width=96, height=64, steps=STEPS, cfg_scale=4.0, seed=7,
                        callback=ours_recording(ours_steps))  # fmt: skip
    assert got.shape == expected.shape == (1, 4, 64, 96)
    sig = make_sigmas("dynamic", STEPS, 64, 96)
    errs = [rel_close(packed(o), t, TOL) for o, t in zip(velocities(ours_steps, sig), theirs_v, strict=True)]
    errs.append(rel_close(got, expected, TOL))
    print("t2i parity (velocities..., image):", errs)


def test_a_batch_of_prompts_of_different_lengths_matches_diffusers(models):
    """Two prompts (padded rows, a key mask), two negatives, true CFG: one row each, the same noise draws."""
    prompts, negatives = ["a red fox in the snow at dawn, watercolour", "owl"], ["blurry", "low quality, jpeg"]
    ref = reference_pipeline(models, 2.5, [])
    with torch.no_grad():
        expected = ref(prompt=prompts, negative_prompt=negatives, height=64, width=64, num_inference_steps=2,
                       generator=torch.Generator().manual_seed(1), output="images", output_type="pt")  # fmt: skip
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    got = pipe.generate(prompts, negatives, width=64, height=64, steps=2, cfg_scale=2.5, seed=1)
    assert got.shape == expected.shape == (2, 4, 64, 64)
    print("batch parity (images):", rel_close(got, expected, TOL))
    with pytest.raises(ValueError, match="negative_prompt: 1 prompts for 2"):
        pipe.generate(prompts, ["x"], width=64, height=64, steps=1)
    with pytest.raises(ValueError, match=r"noise: shape \[1, 64, 4, 4\], expected \[2, 64, 4, 4\]"):
        pipe.generate(prompts, width=64, height=64, steps=1, noise=torch.zeros(1, 64, 4, 4))


def test_edit_with_three_references_of_different_aspect_matches_diffusers(models):
    rgba = np.random.RandomState(3).randint(0, 256, (200, 150, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(150)[None] < 60, 0, 180)  # transparent left part, translucent right part
    images = [noise_image(200, 300, 1), Image.fromarray(rgba, "RGBA"), noise_image(250, 250, 2)]  # 3:2, 3:4, 1:1
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    theirs_v, ours_steps = [], []
    ours = pipe.edit("put <image2> on <image1>, style of <image3>", images, "blurry", resize="official",
                     resolution=320, steps=2, cfg_scale=3.0, seed=5, callback=ours_recording(ours_steps))  # fmt: skip
    h, w = ours.shape[-2:]
    assert (w, h) == (384, 256)  # image_1 at about 320^2 pixels, sides multiples of 32
    ref = reference_pipeline(models, 3.0, theirs_v)
    with torch.no_grad():
        expected = ref(
            prompt="put <image2> on <image1>, style of <image3>", negative_prompt="blurry", image=images,
            output_resolution=320, height=h, width=w, num_inference_steps=2,
            generator=torch.Generator().manual_seed(5), output="images", output_type="pt",
        )  # fmt: skip
    sig = make_sigmas("dynamic", 2, h, w)
    errs = [rel_close(packed(o), t, TOL) for o, t in zip(velocities(ours_steps, sig), theirs_v, strict=True)]
    errs.append(rel_close(ours, expected, TOL))
    print("edit parity (velocities..., image):", errs)


def test_padded_edit_is_the_reference_on_padded_images_cropped_back(models):
    """resize "pad": the references padded (not resampled) to 320 x 256, the output cropped to image_1's 300 x 230;
    diffusers fed the padded images at an output_resolution whose resize keeps 320 x 256 (PIL's same-size copy)."""
    from qwen_image_core.qwen21.prompts import pad_to_multiple

    images = [noise_image(230, 300, 4), noise_image(250, 310, 5)]
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    ours = pipe.edit("swap <image1> and <image2>", images, steps=2, cfg_scale=1.0, seed=2)
    assert ours.shape == (1, 4, 230, 300)
    padded = [pad_to_multiple(im)[0] for im in images]
    assert [p.size for p in padded] == [(320, 256)] * 2
    with torch.no_grad():
        expected = reference_pipeline(models, 1.0, [])(
            prompt="swap <image1> and <image2>", image=padded, output_resolution=286, height=256, width=320,
            num_inference_steps=2, generator=torch.Generator().manual_seed(2), output="images", output_type="pt",
        )  # fmt: skip
    assert expected.shape == (1, 4, 256, 320)
    print("padded edit parity (image):", rel_close(ours, expected[..., :230, :300], TOL))


def test_turbo_text_to_image_matches_diffusers_turbo_blocks(models):
    """The Turbo blocks (no guider; scheduler shift 1, no dynamic shifting) with the published sigma list."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines import QwenImage21TurboAutoBlocks

    ref = reference_pipeline(models, 1.0, [])
    turbo = QwenImage21TurboAutoBlocks().init_pipeline()
    turbo.update_components(
        text_encoder=ref.text_encoder, processor=ref.processor, vae=ref.vae, transformer=ref.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        image_processor=VaeImageProcessor(vae_scale_factor=16),
    )  # fmt: skip
    with torch.no_grad():
        expected = turbo(
            prompt="a red fox", height=64, width=64, sigmas=list(TURBO_SIGMAS), num_inference_steps=8,
            generator=torch.Generator().manual_seed(3), output="images", output_type="pt",
        )  # fmt: skip
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    got = pipe.generate("a red fox", width=64, height=64, steps=8, cfg_scale=1.0, seed=3, schedule="turbo")
    print("turbo parity (image):", rel_close(got, expected, TOL))


def test_prefix_caches_are_filled_once_per_run_with_ten_references(models):
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    calls = []
    dit = models["dit"]
    prefill = DiT21.prefill
    dit.prefill = lambda *a, **k: calls.append(len(k.get("ref_latents") or a[2] or [])) or prefill(dit, *a, **k)
    try:
        pipe.generate("a cat", width=64, height=64, steps=3, cfg_scale=2.0)
        assert calls == [0, 0]  # condition and negative, once each for 3 steps
        refs = [noise_image(256 + 32 * (i % 3), 256, i) for i in range(10)]
        out = pipe.edit(" ".join(f"<image{i + 1}>" for i in range(10)), refs, steps=3, cfg_scale=2.0)
        assert calls[2:] == [10, 10] and out.shape == (1, 4, 256, 256)
    finally:
        del dit.prefill


def test_turbo_schedule_and_steps(models):
    assert torch.equal(make_sigmas("turbo", 8, 1024, 1024), turbo_sigmas())
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    with pytest.raises(ValueError, match="turbo schedule has 8 steps"):
        pipe.generate("a cat", width=64, height=64, steps=4, cfg_scale=1.0, schedule="turbo")
    assert make_sigmas("dynamic", 1, 1024, 1024).tolist() == [1.0, 0.0]  # one step: 1 -> 0, not NaN
    one = pipe.generate("a cat", width=64, height=64, steps=1, cfg_scale=1.0)
    assert bool(torch.isfinite(one).all())


# -- pixel-exact edits, by construction


class SpaceToChannelVAE(ImageVAE21):
    """An identity-like VAE: 16x16 pixels of 4 channels <-> 1024 latent channels, exactly invertible."""

    def __init__(self):
        nn.Module.__init__(self)
        self.cfg = VAE21Config(z_dim=1024, latents_mean=(0.0,) * 1024, latents_std=(1.0,) * 1024)

    def encode(self, images, **kwargs):
        return F.pixel_unshuffle(images, 16)

    def decode(self, latents, **kwargs):
        return F.pixel_shuffle(latents, 16)


class OntoImage1(DiT21):
    """A DiT whose prediction is image_1's latent: v = (x - ref_1) / sigma, so Euler's last step lands on it."""

    def prefill(self, txt, image_slots=None, ref_latents=None, txt_mask=None, **kwargs):
        return ref_latents[0]

    def forward(self, img, timestep, *args, cache=None, **kwargs):
        sigma = torch.as_tensor(timestep).reshape(-1, 1, 1, 1)
        return (img - cache.to(img)) / sigma


def test_a_reference_not_a_multiple_of_32_round_trips_without_a_shift(models):
    pipe = QwenImage21Pipeline(OntoImage1(WD.tiny_config(in_channels=1024, out_channels=1024, text_dim=256)),
                               SpaceToChannelVAE(), models["encoder"])  # fmt: skip
    a = np.full((230, 300, 4), 40, dtype=np.uint8)  # 300 x 230: neither side a multiple of 32 (nor of 16)
    a[..., 3] = 255
    a[:, :50, 3] = 0  # a transparent band: alpha must come through
    a[227, 297] = (255, 0, 0, 255)  # 1-pixel markers near the padded corner and the origin
    a[3, 5] = (0, 255, 0, 128)
    other = noise_image(260, 270, 0)
    out = pipe.edit("keep it", [Image.fromarray(a, "RGBA"), other], steps=2, cfg_scale=1.0)
    assert out.shape == (1, 4, 230, 300)
    got = (out[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(got, a)  # every pixel, alpha included, where it was
    red = (got[..., 0].astype(int) - got[..., 1]).argmax()
    assert np.unravel_index(red, got.shape[:2]) == (227, 297)
    comfy = torch.from_numpy(a)[None].float() / 255  # ComfyUI's IMAGE [B, H, W, C] batch: B references
    assert torch.equal(pipe.edit("keep it", comfy, steps=2, cfg_scale=1.0), out)
    official = pipe.edit("keep it", [Image.fromarray(a, "RGBA"), other], resize="official", resolution=320,
                         steps=2, cfg_scale=1.0)  # fmt: skip
    assert official.shape[-2:] == (288, 352)  # the official resize resamples 300 x 230: nothing stays in place
    with pytest.raises(ValueError, match=r"images\[1\] \(image2\): 90x70, padded to 96x96, is outside"):
        pipe.edit("keep it", [Image.fromarray(a, "RGBA"), noise_image(70, 90, 0)], steps=1, cfg_scale=1.0)
    with pytest.raises(ValueError, match=r"images\[0\] \(image1\): 300x230, resized to 288x224, is outside"):
        pipe.edit("keep it", [Image.fromarray(a, "RGBA")], resize="official", resolution=256, steps=1, cfg_scale=1.0)


# -- bad inputs


def test_eleven_references_are_refused_before_any_work(models):
    pipe = QwenImage21Pipeline(models["dit"], models["vae"], models["encoder"])
    with pytest.raises(ValueError, match=r"images: .* 1 to 10 reference images .* got 11"):
        pipe.edit("x", [noise_image(32, 32, i) for i in range(11)])


def test_components_of_the_other_family_are_named(models):
    with torch.device("meta"):
        dit1 = MMDiT(WD1.tiny_config())
        vae1 = ImageVAE(VAEConfig())
    te1 = TextEncoder(None, None, "")
    dit, vae, enc = models["dit"], models["vae"], models["encoder"]
    with pytest.raises(TypeError, match="dit: MMDiT is not a Qwen-Image-2.1 DiT"):
        QwenImage21Pipeline(dit1, vae, enc)
    with pytest.raises(TypeError, match="vae: ImageVAE is not the Qwen-Image-2.1 VAE"):
        QwenImage21Pipeline(dit, vae1, enc)
    with pytest.raises(TypeError, match="encoder: TextEncoder is not the Qwen-Image-2.1 condition encoder"):
        QwenImage21Pipeline(dit, vae, te1)
    with pytest.raises(ValueError, match="negative_prompt: not used with cfg_scale 1"):
        QwenImage21Pipeline(dit, vae, enc).generate("x", "y", width=64, height=64, steps=1, cfg_scale=1.0)


def test_the_v1_pipeline_names_2_1_components(models):
    with torch.device("meta"):
        dit1 = MMDiT(WD1.tiny_config())
        vae1 = ImageVAE(VAEConfig())
    dit, vae, enc = models["dit"], models["vae"], models["encoder"]
    with pytest.raises(TypeError, match="dit: DiT21 is not a Qwen-Image \\(v1\\) MMDiT.*QwenImage21Pipeline"):
        QwenImagePipeline(dit, vae1)
    with pytest.raises(ValueError, match="vae: 64 latent channels.*Qwen-Image-2.1 VAE does not fit the v1 DiT"):
        QwenImagePipeline(dit1, vae)
    with pytest.raises(TypeError, match="text_encoder: Qwen3VLEncoder is not the Qwen2.5-VL text encoder"):
        QwenImagePipeline(dit1, vae1, enc)
    QwenImagePipeline(dit1, vae1)  # the v1 parts together are fine
