"""Per-block torch.compile (issue 13, 5): the DiT's blocks compile (Dynamo capture, the "eager" backend: inductor
takes about a minute to build on this CPU), all blocks share one graph, and the compiled model equals the eager one
bit for bit, resident and with blocks streaming (the executor's hooks stay outside the compiled forward)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from qwen_image_core import compiled as C
from qwen_image_core import offload as O
from qwen_image_core import offload_plan as P
from qwen_image_core.mmdit import load_dit
from tools.checkpoints import dit as D

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_blocks_equal_eager_resident_and_streamed(tmp_path):
    cfg = D.tiny_config(num_layers=4)
    dit = load_dit(D.write_comfy(tmp_path / "dit.safetensors", cfg, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, cfg.text_dim, generator=g)
    t = torch.tensor([0.5, 0.5])
    sizes, fixed = P.split_blocks(dit, dit.transformer_blocks)
    plan = P.plan_blocks(sizes, fixed, 1 << 40, 0, 0, 1.0, 1e9, max_resident=1)  # 3 of 4 blocks stream
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        ref = dit(img, t, txt)
        with C.using(dit.transformer_blocks, "eager") as n:
            resident = dit(img, t, txt)
            with O.BlockStreamer(dit, dit.transformer_blocks, plan, O.Transfer()) as s:
                streamed = [dit(img, t, txt) for _ in range(2)]
        after = dit(img, t, txt)
    assert n == 4 and s.stats.passes == 2 and sum(s.stats.copies.values()) == 6
    assert torch.equal(resident, ref) and all(torch.equal(y, ref) for y in streamed)
    assert dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs") == 1  # one graph for every block
    assert not torch._dynamo.utils.counters["recompiles"]
    assert "forward" not in dit.transformer_blocks[0].__dict__ and torch.equal(after, ref)  # eager again
    with pytest.raises(ValueError, match="compile backend 'cudagraphs'"):
        with C.using(dit.transformer_blocks, "cudagraphs"):
            pass
