"""The DiT loader's `devices` inside ComfyUI's model management (issue 20, part 1), in process: the native MODEL
spread over a fake main GPU (what ComfyUI sees) and a second accounted device, placed by ComfyUI's own
`load_models_gpu`; outputs bit-equal to the unplaced model, each device within its budget."""

from __future__ import annotations

import importlib

import pytest
import torch

from tools.checkpoints import dit as W
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.model_management as mm  # noqa: E402

import_pack()
native_model = importlib.import_module("qwenpix.nodes.native_model")
patcher = importlib.import_module("qwenpix.nodes.patcher")
parallel = importlib.import_module("qwenpix.nodes.parallel")
host = importlib.import_module("qwenpix.nodes.host")
transfer = importlib.import_module("qwenpix.qwen_image_core.transfer")
costs = importlib.import_module("qwenpix.qwen_image_core.costs")
mmdit = importlib.import_module("qwenpix.qwen_image_core.mmdit")

pytestmark = pytest.mark.usefixtures("one_thread")

GPU, SECOND = torch.device("meta"), torch.device("cuda", 1)  # ComfyUI's device (fake), the second (fake)
MiB = 1 << 20
LAYERS = 6
CARD = costs.Card("fake GPU", 64 * MiB, 1.0, 1.0)


class Device(transfer.Transfer):
    """A CPU stand-in device with `free` bytes (less what it holds)."""

    def __init__(self, free: int):
        super().__init__("cpu")
        self.size = free

    def free_memory(self) -> int:
        return self.size - self.allocated


@pytest.fixture
def devices(monkeypatch):
    """ComfyUI on a fake GPU; the seam gives our placements one accounted Device per device."""
    made: dict[str, Device] = {}
    sizes = {str(GPU): 64 * MiB, str(SECOND): 0}

    def make(device):
        made[str(device)] = Device(sizes[str(device)])
        return made[str(device)]

    free = lambda dev=None, torch_free_too=False: (1 << 40, 0) if torch_free_too else 1 << 40  # noqa: E731
    monkeypatch.setattr(mm, "current_loaded_models", [])
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "get_torch_device", lambda: GPU)
    monkeypatch.setattr(mm, "soft_empty_cache", lambda force=False: None)
    monkeypatch.setattr(mm, "get_free_memory", free)
    monkeypatch.setattr(patcher, "SEAM", patcher.DeviceSeam(make, lambda d: CARD))
    return made, sizes


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    cfg = W.tiny_config(num_layers=LAYERS)
    return W.write_comfy(tmp_path_factory.mktemp("dit") / "dit.safetensors", cfg, dtype=torch.float32)


INPUTS = (torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)),
          torch.tensor([0.6, 0.6]), torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(2)))  # fmt: skip


def forward(m) -> torch.Tensor:
    with torch.inference_mode():
        return m.model.diffusion_model(*INPUTS)


def test_spread_model_in_comfyui_model_management(devices, dit_file):
    made, sizes = devices
    dit = mmdit.load_dit(dit_file)
    m = native_model.dit_model(dit, torch.float32)
    reference = forward(m)  # not placed: on the host
    base = m.model
    block = sum(t.numel() * t.element_size() for t in dit.transformer_blocks[0].parameters())
    sizes[str(SECOND)] = 3 * block + (64 << 10)  # holds 3 blocks; ComfyUI's budget decides the first device's share
    base.last_workload = costs.DiTWorkload(64, 64, 1, True, 7)
    spread = parallel.SpreadPlacement(base.diffusion_model, [GPU, SECOND], lambda: base.last_workload, reserve=0)
    base.qwenpix_placement, m.load_device = spread, GPU  # as parallel.spread does for a real cuda:0,cuda:1
    budget = 2 * block + (256 << 10)  # head + tail + 2 blocks on ComfyUI's device: the rest must go to the second
    m.load(GPU, lowvram_model_memory=budget)
    plan = spread.streamer.plan
    assert plan.devices == (str(GPU), str(SECOND)) and [len(s.blocks) for s in plan.stages] == [2, 4]
    assert plan.stages[1].plan.streamed  # the second holds 3 of its 4 blocks resident, 1 streams
    first, second = made[str(GPU)], made[str(SECOND)]
    out = forward(m)
    assert torch.equal(out, reference)
    assert first.peak <= budget and second.peak <= sizes[str(SECOND)]
    assert m.loaded_size() == spread.held == plan.stages[0].plan.device_bytes >= first.allocated  # what ComfyUI sees
    assert spread.device == GPU and spread.streams and str(SECOND) in spread.last_plan
    with pytest.raises(host.InputError, match="ControlNet residuals are not supported"):
        m.model.diffusion_model(*INPUTS, control={"output": [torch.zeros(1)]})
    m.load(GPU, lowvram_model_memory=budget)  # the same budget again: nothing moves
    assert spread.placed_bytes == sum(s.stats.load_bytes for s in spread.streamer.streamers)
    mm.load_models_gpu([m], memory_required=1 * MiB)  # ComfyUI's own loader: the full budget, all on the first
    assert torch.equal(forward(m), reference) and m.loaded_size() == spread.held >= first.allocated
    m.unpatch_model(torch.device("cpu"))  # ComfyUI unloads it: every device emptied
    assert first.allocated == 0 and second.allocated == 0 and spread.held == 0
    assert torch.equal(forward(m), reference)  # back on the host


def test_devices_input(devices, dit_file):
    m = native_model.dit_model(mmdit.load_dit(dit_file), torch.float32)
    single = m.model.qwenpix_placement
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(host.InputError, match=f"'cuda:{n}' does not exist on this machine"):
        parallel.spread(m, ",".join([*(f"cuda:{i}" for i in range(n)), f"cuda:{n}"]))
    with pytest.raises(host.InputError, match="CUDA devices only"):
        parallel.spread(m, "cpu")
    with pytest.raises(host.InputError, match="listed twice"):
        parallel.spread(m, "cuda:0,cuda:0")
    assert parallel.spread(m, "") is None and m.model.qwenpix_placement is single
