"""Residency of QwenPix models inside ComfyUI's real model management (issue 12, deliverable 5), in process, on a
fake GPU, counting the bytes placed.

ComfyUI's own `load_models_gpu` / `free_memory` / `LoadedModel` run unchanged; what is faked is the device:
- the device is `torch.device("meta")`, so ComfyUI treats it as a GPU (it never frees memory for the CPU);
- our placements reach it through `nodes.patcher.SEAM`: a CPU `Transfer` whose "device" tensors stay on the
  CPU and are counted (`allocated`, `peak`, `uploaded` = bytes placed), and a fixed `Card`;
- ComfyUI's memory queries (`get_free_memory`, `get_total_memory`, the reserves) read the fake budget minus what
  our Transfers and the native models loaded on the device hold;
- the native model in between is a real `comfy.model_patcher.ModelPatcher` of a module without tensors and an
  explicit `size=`: ComfyUI loads, counts and unloads it with its own code, and its `.to(meta)` has nothing to
  move (a module with tensors would end up with meta tensors that cannot be moved back to the CPU).
The pack is imported as a package (`qwenpix`), only the node modules under test (not `nodes/__init__.py`, which
imports every node module; ComfyUI's own top-level `nodes` module is never shadowed).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tools.checkpoints import dit as W
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.weight_adapter  # noqa: E402

import_pack()
native_model = importlib.import_module("qwenpix.nodes.native_model")
patcher = importlib.import_module("qwenpix.nodes.patcher")
placement = importlib.import_module("qwenpix.nodes.placement")
placement_core = importlib.import_module("qwenpix.qwen_image_core.placement")
offload_plan = importlib.import_module("qwenpix.qwen_image_core.offload_plan")
transfer = importlib.import_module("qwenpix.qwen_image_core.transfer")
mmdit = importlib.import_module("qwenpix.qwen_image_core.mmdit")

pytestmark = pytest.mark.usefixtures("one_thread")

GPU = torch.device("meta")
MiB = 1 << 20
BUDGET = 8 * MiB  # the fake GPU
INFERENCE = 256 << 10  # comfy.model_management.minimum_inference_memory()
RESERVE = 64 << 10  # EXTRA_RESERVED_VRAM (--reserve-vram)
PROMPT = 1 * MiB  # a prompt's memory_required
LAYERS = 6


class CountingTransfer(transfer.Transfer):
    """The CPU Transfer, also counting the bytes placed (`uploaded`) and those streamed per pass (`streamed`)."""

    def __init__(self):
        super().__init__("cpu")
        self.uploaded = 0
        self.streamed = 0

    def to_device(self, t):
        self.uploaded += t.numel() * t.element_size()
        return super().to_device(t)

    def copy(self, dst, src, after):
        self.streamed += src.numel()
        return super().copy(dst, src, after)


class NativeWeights(torch.nn.Module):
    """A native model's weights as ComfyUI's model management sees them: only a size (the patcher's `size=`)."""


class FakeGPU:
    """The device budget; held = what our Transfers hold plus the native models ComfyUI loaded on it."""

    def __init__(self, budget: int):
        self.budget, self.transfers, self.natives = budget, [], []

    def transfer(self, device) -> CountingTransfer:
        assert device == GPU
        self.transfers.append(CountingTransfer())
        return self.transfers[-1]

    def card(self, device):
        return offload_plan.Card("fake GPU", self.budget, 1.0, 1.0)

    def held(self) -> int:
        native = sum(n.loaded_size() for n in self.natives if n.model.device == GPU)
        return sum(t.allocated for t in self.transfers) + native

    def free(self, dev=None, torch_free_too=False):
        free = 1 << 40 if dev is not None and torch.device(dev).type == "cpu" else self.budget - self.held()
        return (free, 0) if torch_free_too else free

    def total(self, dev=None, torch_total_too=False):
        return (self.budget, self.budget) if torch_total_too else self.budget

    def native(self, size: int) -> comfy.model_patcher.ModelPatcher:
        m = comfy.model_patcher.ModelPatcher(NativeWeights(), load_device=GPU, offload_device=torch.device("cpu"),
                                             size=size)  # fmt: skip
        self.natives.append(m)
        return m


def fake_gpu(monkeypatch, budget: int) -> FakeGPU:
    """ComfyUI on a fake GPU of `budget` bytes, with an empty loaded-model list (NORMAL_VRAM); the text encoders'
    device too. Other test modules' fixtures call it with their own budget."""
    fake = FakeGPU(budget)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "get_torch_device", lambda: GPU)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: GPU)
    monkeypatch.setattr(mm, "get_free_memory", fake.free)
    monkeypatch.setattr(mm, "get_total_memory", fake.total)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: INFERENCE)
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", RESERVE)
    monkeypatch.setattr(mm, "soft_empty_cache", lambda force=False: None)
    monkeypatch.setattr(patcher, "SEAM", patcher.DeviceSeam(fake.transfer, fake.card))
    return fake


@pytest.fixture
def gpu(monkeypatch):
    """ComfyUI on a fake GPU of BUDGET bytes."""
    return fake_gpu(monkeypatch, BUDGET)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return W.write_comfy(tmp_path_factory.mktemp("dit") / "dit.safetensors", W.tiny_config(num_layers=LAYERS))


@pytest.fixture
def dit(dit_file):
    """A freshly loaded tiny DiT (its base patcher and placement are made on first use, on the fake GPU)."""
    return mmdit.load_dit(dit_file)


# -- helpers


def loaded() -> list:
    return [lm.model for lm in mm.current_loaded_models]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def block_bytes(blocks, indices) -> int:
    """Bytes of the tensors of blocks[i] for i in indices, as stored (what placing them moves)."""
    return sum(nbytes([*blocks[i].parameters(), *blocks[i].buffers()]) for i in indices)


def state(m) -> tuple:
    """(resident blocks, streamed blocks) of the placement of patcher m; ((), ()) when not placed."""
    off = m.placement.offloaded
    if off is None or not off.attached:
        return (), ()
    return off.plan.resident, off.plan.streamed


def prompt(m, memory_required=PROMPT):
    """What our sampler / ComfyUI's sampler does before sampling: have ComfyUI load the model."""
    mm.load_models_gpu([m], memory_required=memory_required)


INPUTS = (torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)),
          torch.tensor([0.6]), torch.randn(1, 7, 40, generator=torch.Generator().manual_seed(2)))  # fmt: skip


def forward(m) -> torch.Tensor:
    with torch.inference_mode():
        return m.model.diffusion_model(*INPUTS)


def forward_watched(m, t: CountingTransfer) -> tuple[torch.Tensor, list[bool]]:
    """forward(m), and for each block as it runs whether all its weights lie in device memory of `t`."""
    seen = []

    def check(module, args):
        seen.append(all(t.on_device(p) for p in module.parameters()))

    hooks = [b.register_forward_pre_hook(check) for b in m.model.diffusion_model.transformer_blocks]
    try:
        return forward(m), seen
    finally:
        for h in hooks:
            h.remove()


# -- 1. two prompts in a row


def test_two_prompts_in_a_row_place_the_dit_once(gpu, dit):
    m = native_model.dit_model(dit, torch.float32)
    assert m.load_device == GPU and loaded() == []
    total = nbytes(dit.state_dict().values())  # 4155472 bytes: the DiT as stored (bf16)
    prompt(m)
    t = gpu.transfers[0]
    assert len(gpu.transfers) == 1 and t.uploaded == total == m.placement.placed_bytes
    assert t.allocated == total and state(m)[1] == ()  # all resident, nothing streams
    assert loaded() == [m] and m.loaded_size() == m.placement.held >= total  # ComfyUI counts the true size
    assert m.model.device == GPU and not m.model.model_lowvram

    prompt(m)  # the same MODEL again (the loader's cached output)
    assert t.uploaded == total and m.placement.placed_bytes == total and t.allocated == total
    assert loaded() == [m]

    again = native_model.dit_model(dit, torch.float32)  # the loader ran again: a fresh clone of the same weights
    prompt(again)
    assert t.uploaded == total and t.allocated == total and again.placement is m.placement
    assert loaded() == [again]  # ComfyUI replaced the clone's entry; nothing was moved
    assert again.loaded_size() == m.placement.held


# -- 2. a native model in between


def test_a_native_model_that_needs_the_room_evicts_ours_and_the_next_prompt_re_places_it(gpu, dit):
    m = native_model.dit_model(dit, torch.float32)
    prompt(m)
    t, total = gpu.transfers[0], m.placement.placed_bytes
    native = gpu.native(BUDGET - INFERENCE - (64 << 10))  # fits alone, not beside any of ours
    mm.load_models_gpu([native])
    assert loaded() == [native] and native.loaded_size() == native.model_size()
    assert t.allocated == 0 and m.loaded_size() == 0 and state(m) == ((), ())  # evicted, fully
    assert m.model.device == torch.device("cpu") and not m.model.model_lowvram
    assert gpu.held() == native.model_size() <= BUDGET

    prompt(m)
    assert loaded() == [m] and native.loaded_size() == 0  # ComfyUI evicted the native model in turn
    assert t.allocated == total and m.placement.placed_bytes == 2 * total and t.uploaded == 2 * total


def test_a_native_model_that_needs_part_of_the_room_shrinks_ours_to_a_streaming_plan(gpu, dit):
    m = native_model.dit_model(dit, torch.float32)
    prompt(m)
    t, total, blocks = gpu.transfers[0], m.placement.placed_bytes, dit.transformer_blocks
    free = gpu.free()
    native = gpu.native(5 * MiB)
    asked = native.model_size() * 1.1 + INFERENCE - free  # what free_memory asks of us
    assert 0 < asked < m.loaded_size()
    before = t.allocated
    mm.load_models_gpu([native])
    resident, streamed = state(m)
    assert loaded() == [native, m] and streamed and len(resident) < LAYERS  # still loaded, streaming
    assert before - t.allocated >= asked and m.loaded_size() <= before - asked  # freed what ComfyUI asked
    assert m.model.model_lowvram and m.placement.streams
    assert t.uploaded == total  # shrinking from all-resident moved nothing
    assert t.peak == before  # ... and never held more than before
    assert native.loaded_size() == native.model_size() and gpu.held() <= BUDGET

    prompt(m)  # the next prompt: ComfyUI frees the native model, ours grows back
    assert loaded() == [m] and native.loaded_size() == 0 and state(m) == (tuple(range(LAYERS)), ())
    assert t.uploaded - total == block_bytes(blocks, streamed)  # only the blocks that had been streaming
    assert t.allocated == total and m.placement.placed_bytes == t.uploaded


# -- 3. a changed workload


def test_a_changed_workload_re_plans_without_a_full_upload(gpu, dit):
    m = native_model.dit_model(dit, torch.float32)
    blocks = dit.transformer_blocks

    def sample(side):  # what comfy.sampler_helpers.prepare_sampling asks for a side x side latent, CFG batch
        shape = [2, 16, 1, side, side]
        mem = m.model.memory_required(shape)
        mm.load_models_gpu([m], memory_required=mem + INFERENCE, minimum_memory_required=mem + INFERENCE)
        return mem

    small = sample(16)
    t, total = gpu.transfers[0], nbytes(dit.state_dict().values())
    assert state(m)[1] == () and t.uploaded == total
    assert m.placement.offloaded.plan.free == BUDGET - small - INFERENCE - RESERVE  # the reserve counted once

    large = sample(24)  # larger: fewer resident blocks, nothing uploaded
    assert large > small
    resident, streamed = state(m)
    assert streamed and t.uploaded == total and t.allocated < total
    assert m.placement.offloaded.plan.device_bytes <= BUDGET - large - INFERENCE - RESERVE

    sample(16)  # smaller again: only the blocks that become resident move
    assert state(m)[1] == () and t.uploaded - total == block_bytes(blocks, streamed)
    assert t.allocated == total and m.placement.placed_bytes == t.uploaded


def test_budget_changes_between_streaming_plans_move_only_the_difference(gpu, dit):
    m = native_model.dit_model(dit, torch.float32)
    blocks, plans = dit.transformer_blocks, []
    for mem in (PROMPT, 4 * MiB, 5 * MiB, 4 * MiB, PROMPT):
        before = (gpu.transfers[0].uploaded if gpu.transfers else 0, state(m)[0])
        prompt(m, mem)
        t = gpu.transfers[0]
        new = set(state(m)[0]) - set(before[1])
        assert t.uploaded - before[0] == (block_bytes(blocks, new) if before[1] else nbytes(dit.state_dict().values()))
        plans.append(state(m))
        assert m.placement.offloaded.plan.device_bytes <= BUDGET - mem - RESERVE
        assert t.allocated == nbytes(m.placement.offloaded.streamer._resident.values()) + sum(
            s.numel() for s in m.placement.offloaded.streamer._stage
        )
    assert plans[0][1] == () and plans[-1][1] == () and plans[1][1] and plans[2][1]
    assert len(plans[2][0]) < len(plans[1][0])


# -- 4. LoRA'd clones share the placement


def test_lora_clones_share_the_placement_and_their_patches_come_and_go(gpu, dit):
    plain = native_model.dit_model(dit, torch.float32)
    reference = forward(plain)
    prompt(plain)
    t, total = gpu.transfers[0], nbytes(dit.state_dict().values())
    q = dit.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, q.in_features, generator=g), torch.randn(q.out_features, 4, generator=g)
    key = "diffusion_model.transformer_blocks.0.attn.to_q"
    lora = native_model.dit_model(dit, torch.float32)
    added = lora.add_patches({
        f"{key}.weight": comfy.weight_adapter.LoRAAdapter({f"{key}.weight"}, (up, down, 2.0, None, None, None)),
        f"{key}.bias": ("diff", (torch.full_like(q.bias, 0.25, dtype=torch.float32),)),
    })  # fmt: skip
    assert len(added) == 2
    prompt(lora)
    assert t.uploaded == total and t.allocated == total and lora.placement is plain.placement  # nothing moved
    assert loaded() == [lora] and len(q.lora) == 1 and len(q.bias_fns) == 1
    assert q.weight.dtype == torch.bfloat16 and t.on_device(q.weight)  # the stored weight, untouched, on the GPU
    patched = forward(lora)
    assert not torch.equal(patched, reference)

    prompt(plain)  # the plain MODEL again: its (no) patches replace the LoRA's
    assert t.uploaded == total and q.lora == () and q.bias_fns == () and loaded() == [plain]
    assert torch.equal(forward(plain), reference)


# -- 5. --novram and --highvram


def test_novram_streams_every_block(gpu, dit, monkeypatch):
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    m = native_model.dit_model(dit, torch.float32)
    reference = forward(m)
    prompt(m)
    t, plan = gpu.transfers[0], m.placement.offloaded.plan
    assert plan.resident == () and plan.streamed == tuple(range(LAYERS)) and plan.buffers >= 2
    fixed = nbytes(dit.state_dict().values()) - block_bytes(dit.transformer_blocks, range(LAYERS))
    assert t.uploaded == fixed == m.placement.placed_bytes  # only the weights outside the blocks are placed
    assert m.loaded_size() == plan.device_bytes and m.model.model_lowvram

    out, on_device = forward_watched(m, t)  # every block computes from device memory (its staging slot)
    assert on_device == [True] * LAYERS and torch.equal(out, reference)  # streamed = unplaced, bit for bit
    packed = m.placement.offloaded.streamer._packed
    assert t.streamed == sum(packed[i].nbytes for i in range(LAYERS))  # each block crossed once in the pass
    assert all(not t.on_device(p) for p in dit.transformer_blocks.parameters())  # back on the host copies


def test_highvram_keeps_everything_even_past_the_budget(gpu, dit, monkeypatch):
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)
    m = native_model.dit_model(dit, torch.float32)
    total = nbytes(dit.state_dict().values())
    prompt(m, BUDGET - 2 * MiB)  # in NORMAL_VRAM this leaves room for about 2 blocks
    t = gpu.transfers[0]
    assert state(m) == (tuple(range(LAYERS)), ()) and t.uploaded == total == t.allocated
    assert m.loaded_size() == m.placement.held and not m.model.model_lowvram


def test_streamed_placement_computes_the_same_bits(gpu, dit):
    m = native_model.dit_model(dit, torch.float32)
    reference = forward(m)
    prompt(m, 5 * MiB)
    resident, streamed = state(m)
    assert resident and streamed
    t = gpu.transfers[0]
    before = t.streamed
    out, on_device = forward_watched(m, t)
    assert on_device == [True] * LAYERS and torch.equal(out, reference)
    assert t.streamed - before == sum(m.placement.offloaded.streamer._packed[i].nbytes for i in streamed)


# -- the executor under re-planning


def test_re_planning_never_holds_more_than_the_larger_plan():
    """Shrinking from 6 to 7 streamed blocks of 20 streams one block more and moves nothing (the streamed sets
    are nested), and the copies the new plan streams are given back first, so the device never holds more than
    before (ComfyUI shrinks a model to make room: going over first would run out of memory)."""
    blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(20))
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), *blocks)
    sizes, fixed = offload_plan.split_blocks(model, blocks)
    budget = [fixed + 16 * sizes[0]]
    planner = lambda free, max_resident: offload_plan.plan_blocks(sizes, fixed, budget[0], 0, 0, 1e-3, 1e9)  # noqa: E731
    t = CountingTransfer()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        reference = model(x)
    off = placement_core.Offloaded(model, blocks, planner, t).attach()
    assert len(off.plan.streamed) == 6 and off.plan.buffers == 2
    before, old, old_streamed = t.allocated, set(off.plan.resident), set(off.plan.streamed)
    budget[0] -= sizes[0]
    t.peak, uploaded = t.allocated, t.uploaded
    plan = off.replan()
    new = set(plan.resident) - old
    assert len(plan.streamed) == 7 and new == set() and old_streamed < set(plan.streamed)
    assert t.uploaded - uploaded == 0  # nested sets: shrinking uploads nothing
    assert t.peak <= before and t.allocated < before
    with torch.inference_mode():
        assert torch.equal(model(x), reference)
    off.detach(release_host=True)
    assert t.allocated == 0
