"""Placement across several devices (issue 20, part 1) on CPU: three accounted stand-in "devices" (each its own
`Transfer`), blocks spread in contiguous ranges, resident and streamed per device; outputs bit-equal to the
one-device run, each device's bytes within its budget, bytes moved per device counted."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import multi_device as M
from qwen_image_core import multi_device_plan as MP
from qwen_image_core import offload as O
from qwen_image_core.costs import CARDS, DiTWorkload
from qwen_image_core.mmdit import load_dit
from qwen_image_core.offload_plan import PlanError, split_blocks, tensor_bytes
from tools.checkpoints import dit as W

LAYERS = 9
NAMES = ("dev0", "dev1", "dev2")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi_device")
    cfg = W.tiny_config(num_layers=LAYERS, zero_cond_t=True)
    return {
        "fp32": load_dit(W.write_comfy(tmp / "f32.safetensors", cfg, dtype=torch.float32)),
        "bf16": load_dit(W.write_comfy(tmp / "bf16.safetensors", cfg, dtype=torch.bfloat16)),
    }


class Tagged(O.Transfer):
    """A CPU stand-in device: accounts its allocations (as `Transfer`) and remembers the activations copied in."""

    def __init__(self):
        super().__init__()
        self.received: set[int] = set()

    def activation(self, t):
        out = super().activation(t)
        self.received.add(id(out))
        return out


def parts(model):
    sizes, _ = split_blocks(model, model.transformer_blocks)
    head, _, tail = MP.dit_parts(model)
    return sizes, sum(map(tensor_bytes, head)), sum(map(tensor_bytes, tail))


def budgets(model, resident: tuple[int, ...], ring: int = 0) -> list[MP.DeviceBudget]:
    """Budgets holding exactly `resident[j]` blocks (+ a ring of `ring` staging buffers) on device j, the head on
    the first and the tail on the last (no reserve, no activation room: the plans are made with 0 for both)."""
    sizes, head, tail = parts(model)
    out = []
    for j, r in enumerate(resident):
        fixed = (head if j == 0 else 0) + (tail if j == len(resident) - 1 else 0)
        out.append(MP.DeviceBudget(NAMES[j], fixed + (r + ring) * max(sizes), CARDS["24GB"]))
    return out


def spread(model, specs, counts=None):
    plan = MP.plan_dit_devices(model, specs, DiTWorkload(), reserve=0, activation_bytes=0, counts=counts)
    transfers = {d.name: Tagged() for d in specs}
    md = M.place_dit(model, specs, reserve=0, activation_bytes=0, transfers=[transfers[d.name] for d in specs],
                     counts=counts)  # fmt: skip
    assert md.plan == plan
    return plan, transfers, md


def inputs(dtype, refs: int = 0, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 16, 8, 6, generator=g).to(dtype)
    extra = {"ref_latents": [torch.randn(1, 16, 6, 4, generator=g).to(dtype) for _ in range(refs)]} if refs else {}
    return (img, torch.rand(batch, generator=g), torch.randn(batch, 5, 40, generator=g).to(dtype)), extra


def check_arrivals(model, md: M.MultiDeviceStreamer, transfers, log: list):
    """Hooks (after the executor's) on each stage's first block: its inputs are the copies made on its device,
    and every block's weights are on its own device while it runs."""
    handles = []
    for s, t in zip(md.stages, transfers, strict=True):
        for i in s.blocks:

            def pre(module, args, s=s, t=t, i=i):
                assert all(t.on_device(w) for w in O._tensors(module)), f"block {i} runs off {s.device}"
                if i == s.blocks.start and s.first > 0:
                    assert all(id(a) in t.received for a in args[:4]), f"block {i}: inputs not moved to {s.device}"
                log.append((s.device, i))

            handles.append(model.transformer_blocks[i].register_forward_pre_hook(pre))
    return handles


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
@pytest.mark.parametrize("ring", [0, 2, 3], ids=["resident", "streamed", "streamed-everywhere"])
def test_spread_is_bit_identical_within_each_budget(models, storage, ring):
    model = models[storage]
    dt = torch.float32 if storage == "fp32" else torch.bfloat16
    cases = [inputs(dt), inputs(dt, refs=2, seed=1), inputs(dt, batch=1, seed=2)]  # CFG batch, edit (2 refs), single
    references = [model(*a, **k) for a, k in cases]
    resident = {0: (3, 3, 3), 2: (1, 0, 1), 3: (0, 0, 0)}[ring]
    counts = (3, 3, 3) if ring == 3 else None  # the caller's ranges: every device streams part of its range
    specs = budgets(model, resident, min(ring, 2))
    plan, by_name, md = spread(model, specs, counts)
    transfers = [by_name[d] for d in plan.devices]
    assert plan.devices == NAMES and [b for s in plan.stages for b in s.blocks] == list(range(LAYERS))
    if ring == 0:  # all resident: each device filled in order as far as its budget holds
        assert [s.blocks for s in plan.stages] == [range(0, 3), range(3, 6), range(6, 9)]
        assert all(not s.plan.streamed for s in plan.stages)
    elif ring == 2:  # faster than a ring on every device: the first two fill up resident, the last streams
        assert [s.blocks for s in plan.stages] == [range(0, 3), range(3, 5), range(5, 9)]
        assert [len(s.plan.resident) for s in plan.stages] == [3, 2, 1]
        assert [len(s.plan.streamed) for s in plan.stages] == [0, 0, 3]
    else:
        assert [s.blocks for s in plan.stages] == [range(0, 3), range(3, 6), range(6, 9)]
        assert [len(s.plan.resident) for s in plan.stages] == [0, 0, 0]
        assert [len(s.plan.streamed) for s in plan.stages] == [3, 3, 3]
    log: list = []
    with md:
        hooks = check_arrivals(model, md, transfers, log)
        outs = [model(*a, **k) for a, k in cases for _ in range(2)]
        for h in hooks:
            h.remove()
    for k, ref in enumerate(references):
        assert torch.equal(outs[2 * k], ref) and torch.equal(outs[2 * k + 1], ref)
    assert [i for _, i in log] == list(range(LAYERS)) * 6
    for d, s, t, st in zip(specs, plan.stages, transfers, md.streamers, strict=True):
        assert t.peak <= d.free and t.peak <= s.plan.device_bytes and t.allocated == 0  # each budget held
        assert st.stats.passes == 6 and st.stats.bytes_moved == 6 * s.plan.streamed_bytes
        assert st.stats.copies == {i: 6 for i in s.plan.streamed}
    moved = md.moved_bytes()
    assert all(m > 0 for m in moved), moved  # stage 0: the outputs brought back; 1, 2: the activations
    streams = sum(2 * tensor_bytes_of(a) for a in cases[0][0][:1])  # at least the residual streams cross
    assert moved[1] > streams / 2 and moved[2] > streams / 2
    print("\nmoved per device (bytes):", dict(zip(plan.devices, moved, strict=True)))
    print(plan.explain())


def tensor_bytes_of(t):
    return t.numel() * t.element_size()


def test_cfg_sampling_on_three_devices(models):
    from qwen_image_core.pipeline import Conditioning, sample  # noqa: PLC0415

    model = models["fp32"]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    refs = [torch.randn(1, 16, 6, 6, generator=g)]
    cond = Conditioning(torch.randn(1, 7, 40, generator=g), ref_latents=refs)
    uncond = Conditioning(torch.randn(1, 4, 40, generator=g), ref_latents=refs)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])
    for precompute in (True, False):  # the modulation table is made on the first device and moved per block
        ref = sample(model, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0, precompute_modulation=precompute)
        specs = budgets(model, (1, 0, 0), ring=2)
        plan, _, md = spread(model, specs)
        assert len(plan.stages) == 3 and sum(len(s.plan.streamed) for s in plan.stages) >= 2
        with md:
            out = sample(model, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0, precompute_modulation=precompute)
        assert torch.equal(out, ref)
        assert all(st.stats.passes == 3 for st in md.streamers)  # 3 steps, cond and uncond in one pass


def test_plan_choices_and_text(models):
    model = models["bf16"]
    sizes, head, tail = parts(model)
    card = CARDS["24GB"]
    # everything fits on the first device: one stage, the others not needed
    big = [MP.DeviceBudget("dev0", 10 * sum(sizes), card), MP.DeviceBudget("dev1", 10 * sum(sizes), card)]
    plan = MP.plan_dit_devices(model, big, reserve=0, activation_bytes=0)
    assert (
        plan.devices == ("dev0",) and plan.stages[0].head and plan.stages[0].tail and not plan.stages[0].plan.streamed
    )
    assert "dev1: not needed" in plan.explain()
    # a device too small for its ring is left out, the others stream
    specs = budgets(model, (1, 0, 1), ring=2)
    specs[1] = MP.DeviceBudget("dev1", max(sizes), card)
    plan = MP.plan_dit_devices(model, specs, reserve=0, activation_bytes=0)
    assert plan.devices == ("dev0", "dev2") and plan.num_blocks == LAYERS
    text = plan.explain()
    assert "dev1: not used" in text and "streamed" in text and "resident" in text and "held of" in text
    for s in plan.stages:
        assert s.plan.device_bytes <= s.plan.free
    # too small everywhere: a clear error naming each device
    tiny = [MP.DeviceBudget(n, max(sizes), card) for n in NAMES]
    with pytest.raises(PlanError, match="no device can stream") as e:
        MP.plan_dit_devices(model, tiny, reserve=0, activation_bytes=0)
    assert all(n in str(e.value) for n in NAMES)
    with pytest.raises(ValueError, match="listed twice"):
        MP.plan_dit_devices(model, [big[0], big[0]])
    # the time model: a stage per device, boundaries costed
    plan = MP.plan_dit_devices(model, budgets(model, (2, 2, 2)), reserve=0, activation_bytes=0)
    assert plan.step_s == pytest.approx(sum(s.plan.step_s for s in plan.stages) + plan.boundary_s)


def test_device_names(models):
    assert M.parse_devices("cpu") == [torch.device("cpu")]
    with pytest.raises(ValueError, match="give budgets= and cards="):
        M.place_dit(models["bf16"], ["cpu"])
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"'cuda:{n}' does not exist on this machine"):
        M.parse_devices(", ".join([*(f"cuda:{i}" for i in range(n)), f"cuda:{n}"]))
    with pytest.raises(ValueError, match="not a device name"):
        M.parse_devices("gpu0")
    with pytest.raises(ValueError, match="no devices listed"):
        M.parse_devices(" , ")
    with pytest.raises(ValueError, match="listed twice"):
        M.parse_devices("cpu,cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_devices(models):
    """On a machine with GPUs: cuda:0 and the host (one GPU), or cuda:0 and cuda:1, through the real Transfers
    (copy streams, events, device-to-device activations): equal to the model on cuda:0 alone."""
    from qwen_image_core.costs import detect_card  # noqa: PLC0415

    model = models["bf16"]
    (img, sigma, txt), _ = inputs(torch.bfloat16)
    args = (img.cuda(), sigma.cuda(), txt.cuda())
    sizes, head, tail = parts(model)
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    card = detect_card("cuda:0")
    with M.place_dit(model, [MP.DeviceBudget("cuda:0", head + 4 * max(sizes), card)], reserve=0, activation_bytes=0):
        reference = model(*args).cpu()  # blocks 0-1 resident, the rest streamed on cuda:0 alone
    specs = [MP.DeviceBudget("cuda:0", head + 4 * max(sizes), card), MP.DeviceBudget(second, 1 << 40, card)]
    with M.place_dit(model, specs, reserve=0, activation_bytes=0, counts=(4, LAYERS - 4)) as md:
        out = model(*args)
        assert out.device == torch.device("cuda:0") and md.moved_bytes()[1] > 0
    assert torch.equal(out.cpu(), reference) if second != "cpu" else torch.allclose(out.cpu(), reference, atol=2e-2)
