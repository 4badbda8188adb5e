"""The modulation weights of a precomputing run off the device (issue 13, 3), on the fake GPU of test_residency
under ComfyUI 0.3.75's real sampling and model management (comfy.sample.sample = KSampler's path: CFGGuider,
prepare_sampling, load_models_gpu, LoadedModel, free_memory), float32 on the CPU.

An euler run (its modulation precomputed) is planned with `plan_dit(modulation=True)`: the modulation layers stay
on the host, more blocks are resident under the same ComfyUI budget, and the bytes ComfyUI counts drop by the
modulation bytes less the table's; a dpm_2 run (midpoints: per call) on the same loaded model gets them back on
the device; euler -> dpm_2 -> euler moves only the difference and equals today's per-call path bit for bit.

The one test-side seam: ComfyUI computes where the model is loaded (`load_device`), and the fake GPU is the meta
device, so a PREPARE_SAMPLING wrapper (ComfyUI's own extension point) has ComfyUI load the model on the fake GPU
and the sampler then compute on the CPU, where the "device" copies of the fake GPU live.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_modulation_precompute import Reads
from test_residency import GPU, fake_gpu, loaded, nbytes, state

from tools.checkpoints import dit as W
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.model_management as mm  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402

import_pack()
native_model = importlib.import_module("qwenpix.nodes.native_model")
patcher = importlib.import_module("qwenpix.nodes.patcher")
run_modulation = importlib.import_module("qwenpix.nodes.run_modulation")
modulation = importlib.import_module("qwenpix.qwen_image_core.modulation")
mmdit = importlib.import_module("qwenpix.qwen_image_core.mmdit")
offload_plan = importlib.import_module("qwenpix.qwen_image_core.offload_plan")

pytestmark = pytest.mark.usefixtures("one_thread")

MiB = 1 << 20
LAYERS, STEPS = 6, 3
BUDGET = 5 * MiB  # the fake GPU: the per-call plan streams 3 of the 6 blocks (4.2 MB DiT), the precomputing none
CPU = torch.device("cpu")


@pytest.fixture
def gpu(monkeypatch):
    """ComfyUI on test_residency's fake GPU, with this module's budget."""
    return fake_gpu(monkeypatch, BUDGET)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return W.write_comfy(tmp_path_factory.mktemp("dit_mod") / "dit.safetensors", W.tiny_config(num_layers=LAYERS))


@pytest.fixture
def dit(dit_file):
    return mmdit.load_dit(dit_file)


def load_on_fake_gpu(executor, model, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: ComfyUI loads the model on the fake GPU, the sampler computes on the CPU."""
    model.load_device = GPU
    try:
        return executor(model, *args, **kwargs)
    finally:
        model.load_device = CPU


class Watch:
    """A DIFFUSION_MODEL wrapper recording each forward as (norm_out.linear's weights on the device, [per block as
    it runs: (its other weights on the device, its modulation weights on the device)])."""

    def __init__(self, dit, gpu):
        self.gpu, self.dit = gpu, dit
        mod = {id(p) for _, m in modulation.modulation_layers(dit) for p in m.parameters()}
        self.parts = [([p for p in b.parameters() if id(p) not in mod], [p for p in b.parameters() if id(p) in mod])
                      for b in dit.transformer_blocks]  # fmt: skip
        self.forwards: list[tuple[bool, list[tuple[bool, bool]]]] = []

    def __call__(self, executor, *args, **kwargs):
        on, blocks = self.gpu.transfers[0].on_device, []

        def check(parts):
            blocks.append((all(map(on, parts[0])), all(map(on, parts[1]))))

        hooks = [b.register_forward_pre_hook(lambda m, a, parts=parts: check(parts))
                 for b, parts in zip(self.dit.transformer_blocks, self.parts, strict=True)]  # fmt: skip
        self.forwards.append((all(map(on, self.dit.norm_out.linear.parameters())), blocks))
        try:
            return executor(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()


def run(dit, sampler: str, watch: Watch | None = None, precompute: bool = True, last_step=None):
    """KSampler's sampling of the bridged MODEL (cond + uncond, CFG 3) loaded on the fake GPU; returns (latent,
    modulation weight reads, the MODEL). precompute=False: today's per-call path (neither run wrapper)."""
    m = native_model.dit_model(dit, torch.float32)
    m.load_device = CPU  # where KSampler makes its sigmas and the sampler computes (load_on_fake_gpu)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "test", load_on_fake_gpu)
    if watch is not None:
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", watch)
    if not precompute:
        for kind in (
            comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
            comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
        ):
            m.remove_wrappers_with_key(kind, run_modulation.WRAPPER_KEY)
    g = torch.Generator().manual_seed(3)
    pos = [[torch.randn(1, 7, dit.config.text_dim, generator=g), {}]]
    neg = [[torch.randn(1, 5, dit.config.text_dim, generator=g), {}]]
    latent = torch.zeros(1, 16, 1, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    with Reads(dit) as r:
        out = comfy.sample.sample(m, noise, STEPS, 3.0, sampler, "simple", pos, neg, latent, seed=3,
                                  disable_pbar=True, last_step=last_step)  # fmt: skip
    return out, r.count, m


def mod_bytes(dit, blocks=None) -> int:
    """Bytes of the modulation weights (of `blocks`, else all of them, norm_out.linear included)."""
    layers = modulation.modulation_layers(dit)
    if blocks is not None:
        layers = [(n, m) for n, m in layers if n.startswith("transformer_blocks.") and int(n.split(".")[1]) in blocks]
    return nbytes(p for _, m in layers for p in m.parameters())


def block_bytes(dit, blocks) -> int:
    return nbytes(p for i in blocks for p in dit.transformer_blocks[i].parameters())


N_LAYERS = 2 * LAYERS + 1  # modulation layers
PRECOMPUTED = (False, [(True, False)] * LAYERS)  # a forward: every block on the device but its modulation
PER_CALL = (True, [(True, True)] * LAYERS)  # ... with its modulation (resident, or in the block's staging slot)


# fake GPU budget -> resident blocks of 6: (per call, precomputed); at 4 MiB the precomputing plan streams too
BUDGETS = {4 * MiB: (1, 3), 5 * MiB: (3, 6)}


@pytest.mark.parametrize("budget", BUDGETS)
def test_euler_dpm_2_euler_on_one_loaded_model(gpu, dit, budget):
    """euler precomputes (its modulation weights on the host: more blocks resident), dpm_2 on the same loaded model
    computes per call (its modulation back on the device), euler again: each bit-equal to today's per-call path,
    each switch moving only the difference (one host copy of a streamed block serving both), unloading all."""
    gpu.budget = budget
    ref_euler, reads, m = run(dit, "euler", precompute=False)  # today's per-call path, the same budget
    per_call, t = state(m), gpu.transfers[0]
    assert reads == STEPS * N_LAYERS and len(per_call[0]) == BUDGETS[budget][0]
    ref_dpm2, _, _ = run(dit, "dpm_2", precompute=False)
    assert state(m) == per_call
    mm.unload_all_models()
    assert loaded() == [] and t.allocated == 0
    before = t.uploaded

    watch = Watch(dit, gpu)
    out, reads, m = run(dit, "euler", watch)
    pre = state(m)
    assert torch.equal(out, ref_euler) and reads == N_LAYERS  # read once, for the table
    assert len(pre[0]) == BUDGETS[budget][1] > len(per_call[0])  # more blocks resident under the same budget
    assert watch.forwards == [PRECOMPUTED] * STEPS  # no modulation weight on the device during sampling
    off = m.placement.offloaded
    stats, plan, full = off.streamer.stats, off.plan, offload_plan.split_blocks(dit, dit.transformer_blocks)[0]
    assert stats.fetched_bytes == 0 and stats.bytes_moved == STEPS * sum(plan.block_bytes[i] for i in pre[1])
    assert all(plan.block_bytes[i] < full[i] for i in pre[1])  # the streamed blocks cross without their modulation
    # placed: the resident blocks and the other weights, none of the modulation
    assert t.uploaded - before == t.allocated - staging(m) == block_bytes(dit, pre[0]) - mod_bytes(dit, pre[0]) + (
        fixed_bytes(dit)
    )  # fmt: skip
    placed = t.uploaded
    print(f"\nresident blocks (budget {budget} B): per call {len(per_call[0])}/{LAYERS}, "
          f"precomputed {len(pre[0])}/{LAYERS}")  # fmt: skip

    watch.forwards.clear()
    out, reads, m = run(dit, "dpm_2", watch)  # midpoints: per call, on the same loaded model
    assert torch.equal(out, ref_dpm2) and reads > STEPS * N_LAYERS and state(m) == per_call
    assert len(watch.forwards) > STEPS and all(f == PER_CALL for f in watch.forwards)
    # moved: the modulation of the blocks still resident and norm_out.linear's (the streamed sets are nested)
    assert t.uploaded - placed == mod_bytes(dit, per_call[0]) + mod_bytes(dit) - mod_bytes(dit, range(LAYERS))
    assert t.allocated - staging(m) == block_bytes(dit, per_call[0]) + fixed_bytes(dit) + mod_bytes(dit) - mod_bytes(
        dit, range(LAYERS)
    )  # fmt: skip
    placed, host = t.uploaded, m.placement.offloaded.host.nbytes

    watch.forwards.clear()
    out, reads, m = run(dit, "euler", watch)
    assert torch.equal(out, ref_euler) and reads == N_LAYERS and state(m) == pre
    assert watch.forwards == [PRECOMPUTED] * STEPS
    new = sorted(set(pre[0]) - set(per_call[0]))  # only the blocks that become resident move, less their modulation
    assert t.uploaded - placed == block_bytes(dit, new) - mod_bytes(dit, new)
    assert m.placement.offloaded.host.nbytes == host  # the streamed blocks' host copies serve both kinds of run

    mm.unload_all_models()
    assert loaded() == [] and t.allocated == 0 and m.placement.offloaded.host.slabs == []
    assert not m.placement.streams and m.loaded_size() == 0


def fixed_bytes(dit) -> int:
    """Bytes of the weights outside the blocks, norm_out.linear's (a modulation layer) left out."""
    return nbytes(dit.state_dict().values()) - block_bytes(dit, range(LAYERS)) - nbytes(
        dit.norm_out.linear.parameters()
    )  # fmt: skip


def staging(m) -> int:
    return sum(b.numel() for b in m.placement.offloaded.streamer._stage)


def test_comfyui_counts_the_modulation_bytes_less_the_table(gpu, dit):
    gpu.budget = 6 * MiB  # every block resident either way: the counted bytes differ by the modulation alone
    _, _, m = run(dit, "euler", precompute=False)
    assert state(m)[1] == ()
    per_call = m.loaded_size()
    _, _, m = run(dit, "euler")
    assert state(m)[1] == () and not m.model.model_lowvram
    # the run's table: STEPS entries for its forwards of 2 rows (cond + uncond batched), float32
    table = modulation.precompute(dit, [0.5] * STEPS, 2, torch.float32, CPU).nbytes
    mod = sum(offload_plan.tensor_bytes(layer) for _, layer in modulation.modulation_layers(dit))  # as planned
    assert per_call - m.loaded_size() == mod - table
    held = nbytes(dit.state_dict().values()) - mod_bytes(dit)
    assert gpu.transfers[0].allocated == held  # the modulation weights' device copies were given back
    assert m.loaded_size() == m.placement.held >= held + table  # (the planner rounds each tensor up to ALIGN)
    print(f"\nComfyUI counts {per_call} -> {m.loaded_size()} bytes (modulation {mod}, table {table})")


def test_a_forward_per_call_while_the_modulation_is_on_the_host_fetches_it(gpu, dit):
    # KSamplerAdvanced's leftover noise: heun's last evaluation is at sigmas[-1] > 0, outside the table: per call
    ref, _, _ = run(dit, "heun", precompute=False, last_step=2)
    mm.unload_all_models()
    out, reads, m = run(dit, "heun", last_step=2)
    stats = m.placement.offloaded.streamer.stats
    assert torch.equal(out, ref) and reads == 2 * N_LAYERS  # the table, then one call's own
    assert stats.fetched_bytes == mod_bytes(dit)  # each layer copied to the device for that call
    assert gpu.transfers[0].allocated == nbytes(dit.state_dict().values()) - mod_bytes(dit)  # and given back
