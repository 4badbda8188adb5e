"""AdaLN modulation precomputed for a run (issue 13, 3): the same numbers as computing it per step (bit for bit,
LoRA and zero_cond_t included), its weights read once per run, the planner counting the freed bytes (more blocks
resident) and the executor leaving those weights on the host instead of streaming them every step."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import modulation as M
from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.lora import load_lora
from qwen_image_core.mmdit import load_dit
from qwen_image_core.pipeline import Conditioning, sample
from qwen_image_core.sampling import sigmas_comfy
from tools.checkpoints import dit as D
from tools.checkpoints import lora as L

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("modulation")
    cfg = D.tiny_config(num_layers=LAYERS, zero_cond_t=True)
    dit = load_dit(D.write_comfy(tmp / "dit.safetensors", cfg, dtype=torch.bfloat16), zero_cond_t=True)
    lora = load_lora(L.write_lora(tmp / "lora.safetensors", cfg, "kohya"), dit)  # img_mod.1 is among its layers
    return dit, lora


class Reads:
    """Counts weight casts (`compute_weight`) of the modulation layers: one per weight read."""

    def __init__(self, dit):
        self.layers, self.count = [m for _, m in M.modulation_layers(dit)], 0

    def __enter__(self):
        for layer in self.layers:
            cast = layer.compute_weight

            def counted(*a, cast=cast, **k):
                self.count += 1
                return cast(*a, **k)

            layer.compute_weight = counted
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.compute_weight


def conds(cfg, refs: bool):
    g = torch.Generator().manual_seed(1)
    ref = [torch.randn(1, 16, 6, 8, generator=g)] if refs else None
    cond = Conditioning(torch.randn(1, 7, cfg.text_dim, generator=g), None, ref)
    uncond = Conditioning(torch.randn(1, 4, cfg.text_dim, generator=g), None, ref)  # another length: per-row
    return torch.randn(2, 16, 8, 8, generator=g), cond, uncond


@pytest.mark.parametrize("refs", [False, True])  # True: Edit-2511's zero_cond_t (2 x rows of timesteps)
def test_sampling_is_bit_exact_and_reads_the_modulation_weights_once(model, refs):
    dit, lora = model
    noise, cond, uncond = conds(dit.config, refs)
    sigmas = sigmas_comfy(4)
    out, reads = {}, {}
    for pre in (False, True):
        with Reads(dit) as r:
            out[pre] = sample(dit, noise, cond, uncond, sigmas, 3.0, loras=[(lora, 0.8)], precompute_modulation=pre)
        reads[pre] = r.count
    assert torch.equal(out[True], out[False])
    n_layers = 2 * LAYERS + 1  # img_mod.1 and txt_mod.1 per block, norm_out.linear
    assert reads == {False: 4 * n_layers, True: n_layers}  # per step vs once per run


def test_forward_with_a_step_entry_equals_the_forward_without_in_bf16(model):
    dit, _ = model
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(2, 16, 8, 6, generator=g).bfloat16(), torch.randn(2, 5, dit.config.text_dim).bfloat16()
    ref = [torch.randn(1, 16, 4, 4, generator=g).bfloat16()]
    sigmas = [0.9, 0.5]
    table = M.precompute(dit, torch.tensor(sigmas), 2, torch.bfloat16, zero_cond=True)
    assert dict(table.reads) == {name: 1 for name, _ in M.modulation_layers(dit)}
    tensors = [x for _, m in M.modulation_layers(dit) for x in O._tensors(m)]
    assert table.bytes_read == sum(x.numel() * x.element_size() for x in tensors)
    for k, s in enumerate(sigmas):
        t = torch.full((2,), s)
        want = dit(img, t, txt, ref_latents=ref)
        assert torch.equal(dit(img, t, txt, ref_latents=ref, step_mod=table.steps[k]), want)
    with pytest.raises(ValueError, match="precomputed modulation .* is for 4 timestep rows"):
        dit(img, torch.full((2,), 0.9), txt, step_mod=table.steps[0])  # no references: 2 rows, not 4


def test_the_planner_frees_the_modulation_bytes_and_keeps_more_blocks_resident():
    meta = D.meta_model("fp8")
    card, wl = P.CARDS["12GB"], P.DiTWorkload(1328, 1328, cfg=True)
    free = card.vram - (600 << 20)
    plain, pre = (P.plan_dit(meta, free, card, wl, modulation=m) for m in (False, True))
    mod_bytes = 2 * 3072 * 6 * 3072 + 2 * 6 * 3072 * 2  # fp8 weights + bf16 biases of img_mod and txt_mod
    assert plain.block_bytes[0] - pre.block_bytes[0] == mod_bytes
    assert mod_bytes / plain.block_bytes[0] == pytest.approx(0.333, abs=1e-3)  # gpu_review §A5: 33.3 %
    table = 20 * (60 * (2 + 2) * 6 + 2 * 2) * 3072 * 2  # 20 steps of bf16 outputs (rows 2 with CFG)
    assert pre.fixed_bytes == plain.fixed_bytes - (2 * 3072 * 3072 + 2 * 3072 * 2) + table
    assert len(pre.resident) > len(plain.resident) + 10  # the review predicts about 13 more on a 12 GB card
    assert pre.streamed_bytes < plain.streamed_bytes
    assert "modulation precomputed" in pre.explain()


def test_streaming_leaves_the_modulation_on_the_host_and_moves_fewer_bytes(model):
    dit, _ = model
    noise, cond, uncond = conds(dit.config, refs=False)
    sigmas = sigmas_comfy(3)
    ref = sample(dit, noise, cond, uncond, sigmas, 3.0, precompute_modulation=False)
    skip = [m for _, m in M.modulation_layers(dit)]
    moved = {}
    for pre in (False, True):
        sizes, fixed = P.split_blocks(dit, dit.transformer_blocks, skip if pre else ())
        plan = P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1.0, 1e9, max_resident=0)  # every block streams
        t = O.Transfer()
        with O.BlockStreamer(dit, dit.transformer_blocks, plan, t, skip=skip if pre else ()) as s, Reads(dit) as r:
            out = sample(dit, noise, cond, uncond, sigmas, 3.0, precompute_modulation=pre)
            if pre:
                assert not any(t.on_device(x) for m in skip for x in O._tensors(m))  # kept on the host
        assert torch.equal(out, ref)
        assert s.stats.bytes_moved == 3 * plan.streamed_bytes  # one pass per step
        moved[pre] = s.stats.bytes_moved / 3
        reads = r.count
    assert reads == 2 * LAYERS + 1  # with the table: each modulation weight read once in the run
    mod_block_bytes = sum(P.tensor_bytes(m) for m in skip[:-1])
    assert moved[False] - moved[True] == mod_block_bytes


def test_a_placed_dit_with_the_modulation_skipped_samples_the_same(model):
    """The core's component placement (placement.Placement) with a modulation-precomputed plan: in the same budget
    more blocks stay resident and fewer bytes stream, the same latents."""
    from qwen_image_core import placement as PL  # noqa: PLC0415

    dit, _ = model
    noise, cond, uncond = conds(dit.config, refs=False)
    sigmas = sigmas_comfy(3)
    ref = sample(dit, noise, cond, uncond, sigmas, 3.0, precompute_modulation=False)
    skip = [m for _, m in M.modulation_layers(dit)]
    plain = P.split_blocks(dit, dit.transformer_blocks)
    budget = plain[1] + 5 * max(plain[0]) // 2  # without the precompute: a ring of 2, nothing else fits
    resident, moved = {}, {}
    for pre in (False, True):
        s, f = P.split_blocks(dit, dit.transformer_blocks, skip) if pre else plain

        def planner(free, max_resident, s=s, f=f):
            return P.plan_blocks(s, f, budget if free is None else free, 0, 0, 1.0, 1e9, max_resident=max_resident)

        t = O.Transfer()
        comp = PL.Component("dit", dit, dit.transformer_blocks, planner, skip=skip if pre else ())
        place = PL.Placement(t, budget, [comp])
        with place.running("dit") as off:
            out = sample(dit, noise, cond, uncond, sigmas, 3.0, precompute_modulation=pre)
            resident[pre], moved[pre] = len(off.plan.resident), off.streamer.stats.bytes_moved
            assert t.peak <= budget
        assert torch.equal(out, ref)
    assert resident == {False: 0, True: 3} and moved[True] < moved[False]  # all 3 blocks fit once the modulation left
