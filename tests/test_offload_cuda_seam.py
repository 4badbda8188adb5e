"""The offload executor's host and CUDA seams on CPU: pinned slabs shared by power-of-two sizes, and the CUDA
Transfer's own stream / event ordering code run with fake streams and events (no GPU here)."""

from __future__ import annotations

import pytest
import torch
from test_offload import files, inputs, plan_for  # noqa: F401 (files: the fixture)

from qwen_image_core import offload as O
from qwen_image_core.mmdit import load_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def test_host_slabs():
    """Pinned allocations are rounded to powers of two by PyTorch: blocks share power-of-two slabs."""
    assert O.slab_size([339_923_968] * 46) == 1 << 30  # 3 fp8 blocks per GiB: 16 slabs, 17.2 GB for 15.6 GB
    assert O.slab_size([679_662_592] * 54) == 2 << 30
    assert O.slab_size([100, 300, 200]) == 512 and O.slab_size([1000] * 3) == 1024
    packed = [O._Packed(torch.nn.Linear(8, 9)) for _ in range(5)]  # 288 -> 512 + 36 -> 256 bytes each
    assert packed[0].nbytes == 768
    slabs = O.pack_host(packed, O.Transfer())
    assert [s.numel() for s in slabs] == [4096]  # 5 x 1024 = 5120 or 3 x 2048 = 6144 would be more
    assert all(torch.equal(p.host_views[0], p.tensors[0]) for p in packed)


class FakeStream:
    """Stands in for torch.cuda.Stream: records which events it waits for."""

    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        assert event.stream is not None, "waiting on an event that was never recorded"
        self.waited.append(event)

    def synchronize(self):
        pass


class FakeEvent:
    def __init__(self):
        self.stream = None

    def record(self, stream=None):
        self.stream = stream


def test_cuda_transfer_calls_with_fake_streams(files, monkeypatch):  # noqa: F811 (the fixture)
    """The CUDA Transfer's own code, run with fake streams and events (no GPU here): copies are issued on
    the copy stream and wait only for compute-stream events; compute waits only for copy-stream events."""
    compute, active = FakeStream("compute"), []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("copy"))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: active[-1] if active else compute)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class StreamContext:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            active.append(self.s)

        def __exit__(self, *exc):
            active.pop()

    monkeypatch.setattr(torch.cuda, "stream", StreamContext)

    class CpuBackedCuda(O.CudaTransfer):  # host/device allocation on the CPU; ordering code unchanged
        def host_buffer(self, nbytes):
            return torch.empty(nbytes, dtype=torch.uint8)

        def device_buffer(self, nbytes):
            return self._account(torch.empty(nbytes, dtype=torch.uint8))

        def to_device(self, t):
            return self._account(t.clone())

        def copy(self, dst, src, after):
            assert not active
            done = super().copy(dst, src, after)
            assert done.stream is self.stream and not active  # recorded on the copy stream, context left
            return done

    model = load_dit(files["fp32"])
    x = inputs()
    reference = model(*x)
    t = CpuBackedCuda("cuda")
    assert t.device == torch.device("cuda", 0) and t.stream.name == "copy"
    with O.BlockStreamer(model, model.transformer_blocks, plan_for(model, 1, buffers=2), t) as s:
        assert torch.equal(model(*x), reference) and torch.equal(model(*x), reference)
    assert s.stats.copies == {i: 2 for i in s.plan.streamed}
    assert len(t.stream.waited) == 2 * 5 and all(e.stream is compute for e in t.stream.waited)
    assert len(compute.waited) == 2 * 5 and all(e.stream is t.stream for e in compute.waited)
