"""ControlNets planned and streamed with the DiT by the same executor (qwen_image_core/control_offload.py), on CPU
through the Transfer seam: one plan over the ControlNets' and the DiT's blocks, the plan text naming each model's
resident and streamed blocks and bytes, sampling with streamed blocks equal to the all-resident run bit for bit,
the bytes moved per step counted (also on steps where a ControlNet is inactive), the device budget respected."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import control_offload as CO
from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.control import Control
from qwen_image_core.controlnet import InstantXControlNet
from qwen_image_core.mmdit import MMDiT
from qwen_image_core.modulation import modulation_layers
from qwen_image_core.pipeline import Conditioning, sample
from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as D

pytestmark = pytest.mark.usefixtures("one_thread")
DIT, NET = D.tiny_config(num_layers=4), D.tiny_config(num_layers=2)
CARD = P.Card("test card", 1 << 30, 1.0, 1.0)


def dit() -> MMDiT:
    m = MMDiT(DIT)
    m.load_state_dict(D.state_dict(DIT, seed=3), assign=True)
    return m.requires_grad_(False).eval()


def net(extra: int = 0, seed: int = 4, layers: int = 2) -> InstantXControlNet:
    cfg = D.tiny_config(num_layers=layers)
    m = InstantXControlNet(cfg, extra)
    m.load_state_dict(C.state_dict(cfg, seed=seed, extra_channels=extra), assign=True)
    return m.requires_grad_(False).eval()


def job(nets, ends=None):
    """Noise, conditioning, sigmas (4 steps) and one Control per net (strengths 0.8, 0.5, ...)."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    cond = Conditioning(torch.randn(1, 7, DIT.text_dim, generator=g))
    uncond = Conditioning(torch.randn(1, 4, DIT.text_dim, generator=g))
    controls = [
        Control(n, torch.randn(1, n.control_channels, 8, 8, generator=g), 0.8 - 0.3 * i, 0.0, (ends or {}).get(i, 1.0))
        for i, n in enumerate(nets)
    ]
    return noise, cond, uncond, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), controls


def run(model, noise, cond, uncond, sigmas, controls, per_step=None, modulation=True):
    def callback(i, steps, x, denoised):
        if per_step is not None:
            per_step.append(per_step_source())

    per_step_source = getattr(run, "source", lambda: 0)
    return sample(model, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0, controls=controls, callback=callback,
                  precompute_modulation=modulation)  # fmt: skip


def blocks_on_device(models, transfer, log, host=()):
    """Hooks (after the executor's) asserting each block computes from device memory (but the layers in `host`,
    left there on purpose); logs (model, block)."""
    kept = {id(t) for m in host for t in O._tensors(m)}
    handles = []
    for name, m in models.items():
        for i, b in enumerate(m.transformer_blocks):

            def pre(module, args, name=name, i=i):
                placed = [transfer.on_device(t) for t in O._tensors(module) if id(t) not in kept]
                assert all(placed), f"{name} block {i} runs off the device"
                log.append((name, i))

            handles.append(b.register_forward_pre_hook(pre))
    return handles


def test_one_plan_covers_the_controlnet_and_the_dit_blocks():
    d, n = dit(), net()
    full = CO.plan_controlled(d, [n], CO.UNBOUNDED, CARD, reserve=0)
    assert [(p.name, p.first, p.count) for p in full.parts] == [("union ControlNet", 0, 2), ("DiT", 2, 4)]
    assert full.plan.streamed == () and full.plan.num_blocks == 6
    assert full.plan.block_bytes == (*P.split_blocks(n, n.transformer_blocks)[0],
                                     *P.split_blocks(d, d.transformer_blocks)[0])  # fmt: skip
    fixed = P.split_blocks(n, n.transformer_blocks)[1] + P.split_blocks(d, d.transformer_blocks)[1]
    assert full.plan.fixed_bytes == fixed
    block = max(full.plan.block_bytes)
    # a budget for the fixed bytes, 2 resident blocks and a ring of 2: both models lose blocks to streaming
    tight = CO.plan_controlled(d, [n], full.plan.fixed_bytes + 4 * block + block // 2, CARD, reserve=0,
                               activation_bytes=0)  # fmt: skip
    cn, dt = tight.parts
    assert tight.plan.device_bytes <= tight.plan.free
    assert tight.streamed(cn) and tight.resident(cn) == (0,) and tight.streamed(dt)
    text = tight.explain()
    print("\n" + text)
    assert f"union ControlNet: 1/2 blocks resident ({tight.resident_bytes(cn) / 1e6:.2f} MB fp32)" in text
    assert f"1 streamed ({tight.streamed_bytes(cn) / 1e6:.2f} MB per step: blocks [1])" in text
    assert f"DiT: {len(tight.resident(dt))}/4 blocks resident" in text
    assert tight.streamed_bytes(cn) + tight.streamed_bytes(dt) == tight.plan.streamed_bytes
    # the ControlNet's compute counts its positive rows only: half the DiT block's under CFG
    assert tight.plan.name.endswith("with union ControlNet")


@pytest.mark.parametrize("modulation", [True, False])
def test_streamed_sampling_equals_resident_bit_for_bit(modulation):
    d, nets = dit(), [net(), net(extra=4, seed=5, layers=1)]  # a Union and an Inpainting ControlNet
    noise, cond, uncond, sigmas, controls = job(nets)
    reference = run(d, noise, cond, uncond, sigmas, controls, modulation=modulation)
    plan = CO.plan_controlled(d, nets, CO.UNBOUNDED, CARD, reserve=0, max_resident=2, modulation=modulation)
    assert {len(plan.streamed(p)) for p in plan.parts[:2]} & {1, 2} and plan.streamed(plan.parts[2])
    transfer, log = O.Transfer(), []
    with CO.controlled_streamer(d, nets, plan, transfer, modulation=modulation) as s:
        host = [m for _, m in modulation_layers(d)] if modulation else []
        handles = blocks_on_device({"net0": nets[0], "net1": nets[1], "dit": d}, transfer, log, host)
        try:
            out = run(d, noise, cond, uncond, sigmas, controls, modulation=modulation)
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(out, reference)
    per_step = [("net0", 0), ("net0", 1), ("net1", 0)] + [("dit", i) for i in range(4)]
    assert log == per_step * 4  # every block of each step computed from device memory, in run order
    assert s.stats.bytes_moved == 4 * plan.plan.streamed_bytes  # each streamed block once per step
    assert transfer.peak <= plan.plan.device_bytes  # never more than the plan's device bytes
    assert transfer.allocated == 0  # all given back at detach


def test_bytes_per_step_count_only_the_models_that_run():
    d, nets = dit(), [net()]
    noise, cond, uncond, sigmas, controls = job(nets, ends={0: 0.5})  # active on steps 0 and 1 of 4
    reference = run(d, noise, cond, uncond, sigmas, controls)
    full = CO.plan_controlled(d, nets, CO.UNBOUNDED, CARD, reserve=0, modulation=True).plan
    budget = full.fixed_bytes + 7 * max(full.block_bytes) // 2  # streams ControlNet block 1 and DiT blocks
    plan = CO.plan_controlled(d, nets, budget, CARD, reserve=0, activation_bytes=0, modulation=True)
    cn, dt = plan.parts
    assert plan.streamed(cn) and plan.streamed(dt)
    transfer, moved = O.Transfer(), []
    with CO.controlled_streamer(d, nets, plan, transfer, modulation=True) as s:
        run.source = lambda: s.stats.bytes_moved
        try:
            out = run(d, noise, cond, uncond, sigmas, controls, per_step=moved)
        finally:
            del run.source
    assert torch.equal(out, reference)
    steps = [b - a for a, b in zip([0, *moved], moved, strict=False)]
    both, alone = plan.streamed_bytes(cn) + plan.streamed_bytes(dt), plan.streamed_bytes(dt)
    print(f"\nbytes moved per step: {steps} (DiT + ControlNet {both}, DiT alone {alone}); plan:\n{plan.explain()}")
    assert steps == [both, both, alone, alone]
    assert transfer.peak <= plan.plan.device_bytes <= budget  # the budget holds, activations aside


def test_a_plan_for_other_models_is_refused():
    d, n = dit(), net()
    plan = CO.plan_controlled(d, [n], CO.UNBOUNDED, CARD)
    with pytest.raises(ValueError, match=r"the plan is for blocks \[2, 4\]; the models have \[4\]"):
        CO.controlled_streamer(d, [], plan, O.Transfer())


def test_real_sizes_plan_line():
    """The real 20B DiT (fp8) with the real InstantX Union (5 blocks, bf16) on a 12 GB card at 1328x1328 CFG."""
    from qwen_image_core.mmdit import MMDiTConfig  # noqa: PLC0415

    d = D.meta_model("fp8")
    with torch.device("meta"):
        n = InstantXControlNet(MMDiTConfig(num_layers=5)).to(torch.bfloat16)
    card = P.CARDS["12GB"]
    plan = CO.plan_controlled(d, [n], card.vram - int(0.6e9), card, P.DiTWorkload())
    print("\n" + plan.explain())
    cn, dt = plan.parts
    assert cn.count == 5 and dt.count == 60 and cn.storage == "bf16" and dt.storage == "fp8"
    alone = P.plan_dit(d, card.vram - int(0.6e9), card, P.DiTWorkload())
    assert len(plan.plan.resident) < len(alone.resident) + 5  # the ControlNet's bytes take room from the DiT
    assert plan.plan.device_bytes <= plan.plan.free - plan.plan.reserve - plan.plan.activation_bytes
