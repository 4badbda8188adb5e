"""Our CONTROL_NET inside ComfyUI's real model management, in process, on test_residency's fake GPU: the ControlNet
is registered at its true size (`get_models` gives ComfyUI the pack's patcher), ComfyUI's `load_models_gpu` loads
it beside the DiT as sampling does, and within ComfyUI's budget the pack's planner keeps blocks resident and the
executor streams the rest; residuals equal the CPU run's bit for bit, every block computes from device memory,
`--novram` streams every block, and a native model that needs the room makes ComfyUI unload it."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_residency import BUDGET, GPU, INFERENCE, MiB, gpu, loaded, state  # noqa: F401 (gpu: the fixture)

from tools.checkpoints import controlnet as C
from tools.checkpoints import dit as W
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.model_management as mm  # noqa: E402

import_pack()
controlnet_node = importlib.import_module("qwenpix.nodes.controlnet")
native_model = importlib.import_module("qwenpix.nodes.native_model")
core_cn = importlib.import_module("qwenpix.qwen_image_core.controlnet")
mmdit = importlib.import_module("qwenpix.qwen_image_core.mmdit")

pytestmark = pytest.mark.usefixtures("one_thread")
NET = W.tiny_config(num_layers=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn_residency")
    return {
        "net": C.write_instantx(tmp / "cn.safetensors", NET, seed=6, dtype=torch.float32),
        "dit": W.write_comfy(tmp / "dit.safetensors", W.tiny_config(num_layers=6)),
    }


INPUTS = tuple(torch.randn(*s, generator=torch.Generator().manual_seed(i)) for i, s in
               enumerate(((1, 16, 8, 8), (1, 7, 40), (1, 16, 8, 8))))  # fmt: skip


def residuals(control, transfer=None) -> list[torch.Tensor]:
    """The control model's residuals as ComfyUI's ControlNet asks for them (x, timesteps, context, hint), checking
    (with `transfer`) that each block computes from device memory."""
    x, context, hint = INPUTS
    net, seen = control.control_model.net, []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(all(transfer.on_device(p) for p in m.parameters())))
             for b in net.transformer_blocks] if transfer is not None else []  # fmt: skip
    try:
        with torch.inference_mode():
            out = control.control_model(x, torch.tensor([0.6]), context, hint)["input"]
    finally:
        for h in hooks:
            h.remove()
    assert transfer is None or seen == [True] * len(net.transformer_blocks)
    return out


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_comfyui_loads_the_controlnet_at_its_size_and_streams_what_does_not_fit(gpu, files):  # noqa: F811 (the imported fixture)
    net = core_cn.load_controlnet(files["net"])
    control = controlnet_node.comfy_control(net, torch.float32, "official")
    reference = residuals(control)  # on the CPU, before any placement
    (patcher,) = control.get_models()
    assert isinstance(patcher, controlnet_node.QwenPixPatcher) and patcher.load_device == GPU
    assert patcher.model_size() == nbytes(net)  # ComfyUI counts the true size
    assert control.copy().get_models() == [patcher]  # every apply node's copy shares it
    size = nbytes(net)
    prompt = BUDGET - size * 4 // 5  # a job that leaves ComfyUI 80 % of the ControlNet's bytes for it
    mm.load_models_gpu([patcher], memory_required=prompt)
    resident, streamed = state(patcher)
    t = gpu.transfers[-1]
    print(f"\nControlNet {size} bytes; ComfyUI's budget left {BUDGET - prompt}: {patcher.placement.last_plan}")
    assert loaded() == [patcher] and streamed and resident  # loaded, part streaming
    assert patcher.model.model_lowvram and patcher.loaded_size() == patcher.placement.held >= t.allocated
    assert gpu.held() <= BUDGET
    out = residuals(control, t)
    assert all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))
    plan = patcher.placement.offloaded.plan
    assert t.streamed == sum(plan.block_bytes[i] for i in streamed)  # one pass: each streamed block copied once

    mm.load_models_gpu([patcher], memory_required=INFERENCE)  # a small job: all of it resident
    assert state(patcher)[1] == () and not patcher.model.model_lowvram
    out = residuals(control, t)
    assert all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))


def test_sampling_loads_the_dit_and_the_controlnet_together_within_the_budget(gpu, files):  # noqa: F811 (the imported fixture)
    net, dit = core_cn.load_controlnet(files["net"]), mmdit.load_dit(files["dit"])
    control = controlnet_node.comfy_control(net, torch.float32, "official")
    model = native_model.dit_model(dit, torch.float32)
    both = [model, *control.get_models()]  # what comfy.sampler_helpers.prepare_sampling loads
    need = nbytes(net) + nbytes(dit)
    assert need > BUDGET - 2 * MiB
    mm.load_models_gpu(both, memory_required=2 * MiB)
    assert set(loaded()) == set(both) and gpu.held() <= BUDGET
    assert model.placement.held > 0 and both[1].placement.held > 0
    assert state(model)[1] or state(both[1])[1]  # one of them streams: they do not fit together
    print(f"\nDiT: {model.placement.last_plan}\nControlNet: {both[1].placement.last_plan}")
    # (ComfyUI budgets each model in turn; the joint plan that chooses between them is the core's,
    # control_offload.plan_controlled, for headless runs)


def test_novram_streams_every_block_and_a_native_model_unloads_it(gpu, files, monkeypatch):  # noqa: F811
    net = core_cn.load_controlnet(files["net"])
    control = controlnet_node.comfy_control(net, torch.float32, "official")
    reference = residuals(control)
    (patcher,) = control.get_models()
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    mm.load_models_gpu([patcher], memory_required=INFERENCE)
    assert state(patcher) == ((), tuple(range(NET.num_layers)))
    assert all(torch.equal(a, b) for a, b in zip(residuals(control, gpu.transfers[-1]), reference, strict=True))
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    native = gpu.native(BUDGET - INFERENCE - (64 << 10))
    mm.load_models_gpu([native])
    assert loaded() == [native] and state(patcher) == ((), ()) and gpu.transfers[-1].allocated == 0


def test_the_fun_controlnet_is_registered_and_streams_within_comfyuis_budget(gpu, tmp_path):  # noqa: F811
    """The Fun ControlNet Union (2512) takes the same route: ComfyUI counts its true size, the planner keeps what
    fits of its control blocks resident and streams the rest; its hints equal the CPU run's bit for bit."""
    fun_node = importlib.import_module("qwenpix.nodes.controlnet_fun")
    core_fun = importlib.import_module("qwenpix.qwen_image_core.controlnet_fun")
    cfg = W.tiny_config(num_layers=4)
    dit = mmdit.load_dit(W.write_comfy(tmp_path / "dit.safetensors", cfg))
    fun = core_fun.load_fun_controlnet(
        C.write_fun(tmp_path / "fun.safetensors", C.fun_config(cfg, num_blocks=4), seed=7, dtype=torch.float32)
    )
    control = fun_node.control_net(fun, torch.float32, "official", controlnet_node.controlnet_patcher)
    base = native_model.dit_model(dit, torch.float32).model.diffusion_model
    x, context, hint = INPUTS

    def hints(transfer=None):
        seen = []
        hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(all(transfer.on_device(p) for p in
                 m.parameters()))) for b in fun.control_blocks] if transfer is not None else []  # fmt: skip
        try:
            with torch.inference_mode():
                out = control.control_model(x, torch.tensor([0.6]), context, hint, base_model=base)["input"]
        finally:
            for h in hooks:
                h.remove()
        assert transfer is None or seen == [True] * len(fun.control_blocks)
        return [o for o in out if o is not None]

    reference = hints()
    (patcher,) = control.get_models()
    assert isinstance(patcher, controlnet_node.QwenPixPatcher) and patcher.model_size() == nbytes(fun)
    assert control.copy().get_models() == [patcher]
    mm.load_models_gpu([patcher], memory_required=BUDGET - nbytes(fun) * 4 // 5)
    resident, streamed = state(patcher)
    t = gpu.transfers[-1]
    print(f"\nFun ControlNet {nbytes(fun)} bytes: {patcher.placement.last_plan}")
    assert streamed and resident and gpu.held() <= BUDGET
    out = hints(t)
    assert len(out) == 4 and all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))
    plan = patcher.placement.offloaded.plan
    assert t.streamed == sum(plan.block_bytes[i] for i in streamed)
