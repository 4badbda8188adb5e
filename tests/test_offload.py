"""The offload executor on CPU: streamed runs equal the all-resident run bit for bit, the accounting holds."""

from __future__ import annotations

import pytest
import torch

from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core import placement as PL
from qwen_image_core.mmdit import load_dit
from tools.checkpoints import dit as W

LAYERS = 6
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    cfg = W.tiny_config(num_layers=LAYERS)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "fp32": W.write_comfy(tmp / "f32.safetensors", cfg, dtype=torch.float32),
            "bf16": W.write_comfy(tmp / "bf16.safetensors", cfg, dtype=torch.bfloat16),
            "fp8": W.write_fp8(tmp / "fp8.safetensors", cfg),
            "scaled_fp8": W.write_scaled_fp8(tmp / "sfp8.safetensors", cfg),
        }
    finally:
        torch.set_num_threads(n)


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 16, 8, 6, generator=g)
    return img, torch.rand(batch, generator=g), torch.randn(batch, 5, 40, generator=g)


def plan_for(model, resident: int, buffers: int = 2) -> P.Plan:
    """The plan the planner makes when the budget holds exactly `resident` blocks and `buffers` buffers."""
    sizes, fixed = P.split_blocks(model, model.transformer_blocks)
    budget = fixed + (resident + buffers) * max(sizes)
    plan = P.plan_blocks(sizes, fixed, budget, 0, 0, 1.0, 1e9, ring_sizes=(buffers,))
    assert len(plan.resident) == min(resident, LAYERS)
    return plan


def check_placement(model, streamer: O.BlockStreamer, transfer: O.Transfer, log: list):
    """Hooks (registered after the executor's) checking where each block's tensors are while it runs."""
    handles = []
    for i, b in enumerate(model.transformer_blocks):

        def pre(module, args, i=i):
            assert all(transfer.on_device(t) for t in O._tensors(module)), f"block {i} runs off the device"
            log.append(i)

        handles.append(b.register_forward_pre_hook(pre))
    return handles


@pytest.mark.parametrize("storage", ["fp32", "fp8", "scaled_fp8", "bf16"])
def test_streaming_is_bit_identical_with_accounting(files, storage):
    model = load_dit(files[storage])
    img, sigma, txt = inputs()
    dt = torch.bfloat16 if storage != "fp32" else torch.float32
    img, txt = img.to(dt), txt.to(dt)  # the model computes in its input's dtype
    reference = model(img, sigma, txt)
    originals = [t.data_ptr() for t in O._tensors(model)]
    for resident in (0, 1, 3, LAYERS):
        plan = plan_for(model, resident)
        budget = plan.free  # fixed + (resident + 2) blocks
        transfer = O.Transfer()
        with O.BlockStreamer(model, model.transformer_blocks, plan, transfer) as s:
            order: list[int] = []
            hooks = check_placement(model, s, transfer, order)
            outs = [model(img, sigma, txt) for _ in range(3)]
            for h in hooks:
                h.remove()
            # streamed blocks point back at host memory between passes; resident ones stay on the device
            for i, b in enumerate(model.transformer_blocks):
                assert all(transfer.on_device(t) == (i not in plan.streamed) for t in O._tensors(b))
        for out in outs:
            assert torch.equal(out, reference)
        assert order == list(range(LAYERS)) * 3
        assert transfer.peak <= budget and transfer.peak <= plan.device_bytes and transfer.allocated == 0
        assert s.stats.passes == 3
        assert s.stats.copies == {i: 3 for i in plan.streamed}  # each streamed block once per pass
        assert s.stats.bytes_moved == 3 * plan.streamed_bytes
        streamed = {id(t) for i in plan.streamed for t in O._tensors(model.transformer_blocks[i])}
        nbytes = sum(t.numel() * t.element_size() for t in O._tensors(model) if id(t) not in streamed)
        assert s.stats.load_bytes == nbytes  # resident tensors placed once, at attach
        assert [t.data_ptr() for t in O._tensors(model)] == originals  # detach restores the host tensors
    assert torch.equal(model(img, sigma, txt), reference)


def test_cfg_sampling_moves_each_block_once_per_step(files):
    from qwen_image_core.pipeline import Conditioning, sample  # noqa: PLC0415

    model = load_dit(files["fp32"])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    cond = Conditioning(torch.randn(1, 7, 40, generator=g))
    uncond = Conditioning(torch.randn(1, 4, 40, generator=g))
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])
    reference = sample(model, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0)
    plan = plan_for(model, 2)
    with O.BlockStreamer(model, model.transformer_blocks, plan, O.Transfer()) as s:
        out = sample(model, noise, cond, uncond, sigmas=sigmas, cfg_scale=4.0)
    assert torch.equal(out, reference)
    assert s.stats.passes == 3 and s.stats.copies == {i: 3 for i in plan.streamed}  # 3 steps, CFG batched


class RecordingTransfer(O.Transfer):
    """The CPU transfer, logging the ordering calls the CUDA implementation turns into events."""

    def __init__(self):
        super().__init__()
        self.log, self.n = [], 0
        self.slot_of = {}

    def copy(self, dst, src, after):
        self.n += 1
        super().copy(dst, src, after)
        self.log.append(("copy", dst.data_ptr(), after, self.n))
        return ("copied", self.n)

    def wait(self, marker):
        self.log.append(("wait", marker))

    def release(self):
        self.n += 1
        self.log.append(("release", self.n))
        return ("released", self.n)


class LateTransfer(O.Transfer):
    """Copies complete as late as the ordering allows: queued, and done only when a `wait` needs them.
    A block computing before waiting for its copy would see its slot's previous contents."""

    def __init__(self):
        super().__init__()
        self.queue, self.n = [], 0

    def copy(self, dst, src, after):
        self.n += 1
        self.queue.append((self.n, dst, src))
        return self.n

    def wait(self, marker):
        while self.queue and self.queue[0][0] <= marker:
            _, dst, src = self.queue.pop(0)
            dst.copy_(src)


def test_late_copies_still_bit_identical(files):
    model = load_dit(files["bf16"])
    x = inputs()
    reference = model(*x)
    for resident in (0, 2):
        with O.BlockStreamer(model, model.transformer_blocks, plan_for(model, resident, buffers=3), LateTransfer()):
            assert torch.equal(model(*x), reference) and torch.equal(model(*x), reference)


def test_event_ordering_of_the_ring(files):
    """Every copy into a slot waits for the release of the slot's previous block; every streamed block
    waits for its own copy; copies run K - 1 blocks ahead. Two passes, so the ring wraps across them."""
    model = load_dit(files["fp32"])
    plan = plan_for(model, 0, buffers=3)  # all 6 blocks stream through 3 buffers
    t = RecordingTransfer()
    runs: list = []
    with O.BlockStreamer(model, model.transformer_blocks, plan, t) as s:
        for i, b in enumerate(model.transformer_blocks):
            b.register_forward_pre_hook(lambda m, a, i=i: runs.append((i, len(t.log))))
        model(*inputs())
        model(*inputs())
        slots = {b.data_ptr() for b in s._stage}
    copies = {e[3]: e for e in t.log if e[0] == "copy"}
    assert len(copies) == 2 * LAYERS and {c[1] for c in copies.values()} == slots and len(slots) == 3
    released_slot, bound_slot = {}, None
    for e in t.log:
        if e[0] == "release" and bound_slot is None:  # the fence at attach: after all compute before it
            assert not released_slot, "a complete pass needs no fence: slots keep their last release"
            released_slot = dict.fromkeys(slots, ("released", e[1]))
        elif e[0] == "release":  # a block's post-hook: its slot is free once this marker passes
            released_slot[bound_slot], bound_slot = ("released", e[1]), None
        elif e[0] == "copy":
            assert e[2] == released_slot[e[1]], "a copy does not wait for its slot's release"
        elif e[0] == "wait":
            bound_slot = copies[e[1][1]][1]
    waits = [e[1] for e in t.log if e[0] == "wait"]
    assert waits == [("copied", n) for n in sorted(copies)]  # block q waits for copy q, in order
    for k, (block, at) in enumerate(runs):
        issued = sum(1 for e in t.log[:at] if e[0] == "copy") - LAYERS * (k // LAYERS)
        assert issued >= min(LAYERS, block + 3), f"block {block} runs with {issued} copies issued (depth 2)"


def tiny_text_encoder(seed: int = 0):
    from qwen_image_core.qwen_vl import QwenVL, QwenVLConfig  # noqa: PLC0415

    cfg = QwenVLConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=16, mrope_section=(2, 3, 3), vision=None)  # fmt: skip
    torch.manual_seed(seed)
    te = QwenVL(cfg)
    for t in te.parameters():
        t.data.normal_(0, 0.2)
    return te.requires_grad_(False).eval()


def test_text_encoder_layers_stream(files):
    te = tiny_text_encoder()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9).expand(3, 2, 9)
    with torch.inference_mode():
        reference = te(ids, pos)
    layers = te.model.layers
    sizes, fixed = P.split_blocks(te, layers)
    plan = P.plan_blocks(sizes, fixed, fixed + 3 * max(sizes), 0, 0, 1.0, 1e9)  # 1 resident, 3 streamed
    assert (len(plan.resident), plan.streamed, plan.buffers) == (1, (1, 2, 3), 2)
    transfer = O.Transfer()
    with O.BlockStreamer(te, layers, plan, transfer) as s, torch.inference_mode():  # as text_encoder._run
        outs = [te(ids, pos), te(ids, pos)]
    assert all(torch.equal(o, reference) for o in outs)
    assert s.stats.copies == {1: 2, 2: 2, 3: 2} and transfer.peak <= plan.free


def block_args(model):
    """Inputs for calling block 3 on its own."""
    from qwen_image_core import rope  # noqa: PLC0415

    g, d = torch.Generator().manual_seed(5), model.config.hidden
    img, txt, temb = (torch.randn(2, 12, d, generator=g), torch.randn(2, 5, d, generator=g),
                      torch.randn(2, d, generator=g))  # fmt: skip
    pe = rope.rope_table(rope.joint_positions([(4, 3)], 5, device=img.device), model.config.rope_axes, 10000.0)
    return img, txt, temb, pe, None, None


def test_interrupted_and_out_of_order_passes(files):
    """A block failing mid-pass leaves nothing bound to a staging buffer; a block called on its own
    (out of order) is resynchronised and loaded before it runs."""
    model = load_dit(files["fp32"])
    x, args = inputs(), block_args(model)
    reference, block_reference = model(*x), model.transformer_blocks[3](*args)
    plan = plan_for(model, 1)
    assert 3 in plan.streamed
    boom = model.transformer_blocks[3].register_forward_hook(lambda m, a, o: 1 / 0)
    t = RecordingTransfer()
    with O.BlockStreamer(model, model.transformer_blocks, plan, t) as s:
        with pytest.raises(ZeroDivisionError):
            model(*x)
        boom.remove()
        assert not s._bound  # the post-hook ran anyway (always_call): block 3 points back at the host
        n = len(t.log)
        assert torch.equal(model(*x), reference)
        fence = t.log[n]  # the next pass first fences every slot behind the aborted compute
        assert fence[0] == "release" and all(e[2] == ("released", fence[1]) for e in t.log[n + 1 : n + 3])
        boom = model.transformer_blocks[3].register_forward_pre_hook(lambda m, a: 1 / 0)  # after ours
        with pytest.raises(ZeroDivisionError):
            model(*x)
        boom.remove()
        assert torch.equal(model(*x), reference) and not s._bound
        out = model.transformer_blocks[3](*args)
        assert all(torch.equal(a, b) for a, b in zip(out, block_reference, strict=True))
        assert torch.equal(model(*x), reference)
    assert s.stats.passes == 3


class FakeOOM(RuntimeError):
    pass


def test_oom_replans_with_fewer_resident_and_retries_once(files):
    model = load_dit(files["fp32"])
    x = inputs()
    reference = model(*x)
    sizes, fixed = P.split_blocks(model, model.transformer_blocks)

    def planner(free, max_resident):  # free is None on CPU: the test's budget holds 3 blocks + 2 buffers
        return P.plan_blocks(sizes, fixed, fixed + 5 * max(sizes), 0, 0, 1.0, 1e9, max_resident=max_resident)

    attempts = []

    def oom_in_block(module, args):  # block 2 "runs out of memory" while more than one block is resident
        attempts.append(len(off.plan.resident))
        if len(off.plan.resident) > 1:
            raise FakeOOM("CUDA out of memory (injected)")

    hook = model.transformer_blocks[2].register_forward_pre_hook(oom_in_block)
    with PL.Offloaded(model, model.transformer_blocks, planner, O.Transfer(), errors=(FakeOOM,)) as off:
        assert len(off.plan.resident) == 3
        step = off.guarded(model)
        with pytest.warns(UserWarning, match="re-planned from 3 to 1 resident blocks and retrying once"):
            out = step(*x)
        assert torch.equal(out, reference) and attempts == [3, 1] and off.plan.resident == (0,)
        assert "RTX" not in off.message and "1/6 blocks resident" in off.message
        assert torch.equal(step(*x), reference)  # later steps run on the new plan
        hook.remove()

        def always():
            raise FakeOOM("always")

        with pytest.raises(FakeOOM), pytest.warns(UserWarning, match="from 1 to 0 resident"):
            off.run(always)  # one retry only, then the error propagates
    assert all(t.device.type == "cpu" for t in O._tensors(model)) and not off.host.slabs
    assert torch.equal(model(*x), reference)


def test_placement_across_a_job(files, tmp_path):
    """Text encoder -> DiT -> VAE within a budget that holds one at a time, then one that holds all."""
    from qwen_image_core.formats.vae import load_vae  # noqa: PLC0415
    from tools.checkpoints.vae import write_vae  # noqa: PLC0415

    te, dit = tiny_text_encoder(), load_dit(files["fp32"])
    vae = load_vae(write_vae(tmp_path, base_dim=8, dtype=torch.float32))
    d_sizes, d_fixed = P.split_blocks(dit, dit.transformer_blocks)
    t_sizes, t_fixed = P.split_blocks(te, te.model.layers)
    v_bytes = P.tensor_bytes(vae)

    def dit_planner(free, max_resident):
        return P.plan_blocks(d_sizes, d_fixed, free, 0, 0, 1.0, 1e9, "dit", max_resident=max_resident)

    def te_planner(free, max_resident):
        return P.plan_blocks(t_sizes, t_fixed, free, 0, 0, 1.0, 1e9, "te", max_resident=max_resident)

    components = [PL.Component("text_encoder", te, te.model.layers, te_planner),
                  PL.Component("dit", dit, dit.transformer_blocks, dit_planner), PL.Component("vae", vae)]  # fmt: skip
    x = inputs()
    reference = dit(*x)
    budget = d_fixed + 4 * max(d_sizes)  # the DiT streams (2 resident + 2 buffers); TE and VAE fit alone
    assert budget < P.tensor_bytes(dit) and budget > max(P.tensor_bytes(te), v_bytes)
    transfer = O.Transfer()
    place = PL.Placement(transfer, budget, components)
    assert not place.keeps_all()
    with place.running("text_encoder") as placed:
        assert placed.plan.streamed == () and list(place.placed) == ["text_encoder"]
    assert place.placed == {} and transfer.allocated == 0  # offloaded after running
    with place.running("dit") as placed:
        assert len(placed.plan.resident) == 2 and torch.equal(dit(*x), reference)
    slabs = [t.data_ptr() for t in place._offloaded["dit"].host.slabs]
    assert slabs and "dit" not in place.placed  # device memory freed, host copies kept for the next job
    with place.running("dit") as placed:
        assert torch.equal(dit(*x), reference)
        assert [t.data_ptr() for t in placed.host.slabs] == slabs  # not packed again
    with place.running("vae"):
        assert all(transfer.on_device(t) for t in O._tensors(vae))
        assert place.vae_budget(vae) == budget - v_bytes
        vae.decode(torch.zeros(1, 16, 4, 4), budget=place.vae_budget(vae))
    assert transfer.peak <= budget and transfer.allocated == 0

    big = PL.Placement(O.Transfer(), 10 * P.tensor_bytes(dit), components)
    assert big.keeps_all()
    for name in ("text_encoder", "dit", "vae"):
        with big.running(name):
            pass
    assert list(big.placed) == ["text_encoder", "dit", "vae"]  # all stay: nothing moves between jobs
    assert big.vae_budget(vae) == 10 * P.tensor_bytes(dit) - big.held(but="vae") - v_bytes
    big.release_all()
    assert big.placed == {} and big.transfer.allocated == 0
    place.release_all()
    assert all(not o.host.slabs for o in place._offloaded.values())

    cpu_te = PL.Placement(O.Transfer(), budget, [PL.Component("text_encoder", te, on_device=False)])
    assert cpu_te.before("text_encoder") is None and cpu_te.transfer.allocated == 0  # runs on the CPU by choice
