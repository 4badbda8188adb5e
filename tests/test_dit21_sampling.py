"""Sampling the 2.1 DiT against diffusers' QwenImage21Pipeline on prompt embeddings (tiny random DiT, float32):
text-to-image with and without true CFG, through our schedule and Euler with the prefix caches filled once
per run."""

from __future__ import annotations

import torch

from oracles import QWEN_SCHEDULER, assert_close, diffusers_dit21
from qwen_image_core.qwen21 import DiT21, schedule
from qwen_image_core.qwen21.sampler import Condition21, Velocity21, sample
from tools.checkpoints import dit21 as W

H, W_PX, STEPS = 64, 96, 3  # pixels: a 4 x 6 token target


class NoProcessor:
    """The pipeline's constructor asks its processor for the system prompt's length and the image-pad id; the
    embeddings are given, so nothing else is read."""

    def __init__(self):
        self.tokenizer = self

    def apply_chat_template(self, *args, **kwargs):
        return [[0]]

    def encode(self, text):
        return [0]


def pipeline_latents(ref, noise, txt, mask, neg=None, neg_mask=None, cfg=1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    pipe = QwenImage21Pipeline(FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), None, None, NoProcessor(), ref)
    packed = noise.flatten(2).transpose(1, 2)
    out = pipe(
        prompt_embeds=txt, prompt_embeds_mask=mask, negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=cfg, height=H, width=W_PX, num_inference_steps=STEPS, latents=packed, output_type="latent",
    ).images  # fmt: skip
    return out.transpose(1, 2).reshape(noise.shape)


def test_text_to_image_with_and_without_cfg_matches_the_pipeline():
    cfg = W.tiny_config()
    sd = W.state_dict(cfg)
    ours = DiT21(cfg)
    ours.load_state_dict(sd)
    ours.eval()
    ref = diffusers_dit21(cfg, sd)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 64, H // 16, W_PX // 16, generator=g)
    txt, neg = torch.randn(1, 9, cfg.text_dim, generator=g), torch.randn(1, 5, cfg.text_dim, generator=g)
    mask, neg_mask = torch.ones(1, 9, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)
    sigmas = schedule.sigmas(STEPS, schedule.target_tokens(H, W_PX))
    cond, negative = Condition21(txt), Condition21(neg)
    with torch.no_grad():
        assert_close(sample(ours, noise, sigmas, cond), pipeline_latents(ref, noise, txt, mask))
        guided = sample(ours, noise, sigmas, cond, negative, cfg_scale=4.0)
        assert_close(guided, pipeline_latents(ref, noise, txt, mask, neg, neg_mask, 4.0))


def test_caches_are_filled_once_per_run():
    cfg = W.tiny_config(num_layers=1)
    model = DiT21(cfg)
    model.load_state_dict(W.state_dict(cfg))
    calls = []
    prefill = model.prefill
    model.prefill = lambda *a, **k: calls.append(1) or prefill(*a, **k)
    v = Velocity21(model, Condition21(torch.randn(1, 6, cfg.text_dim)), Condition21(torch.randn(1, 4, 40)), 3.0)
    x = torch.randn(1, 64, 4, 4)
    with torch.no_grad():
        for s in (1.0, 0.5, 0.25):
            v(x, torch.tensor([s]))
    assert len(calls) == 2 and set(v.caches) == {"cond", "negative"}
