"""AdaLN modulation precomputed on the bridged native MODEL (issue 13, 3), in process through ComfyUI 0.3.75's own
sampling code (comfy.sample.sample = KSampler's path, CPU, float32): the run's modulation weights are read once
where the sampler stays on the schedule (euler, euler_ancestral, dpmpp_2m, heun), with output latents equal bit
for bit to the per-call path (the same MODEL without the SAMPLER_SAMPLE wrapper); samplers with midpoints (dpm_2,
dpmpp_2s_ancestral) compute per call, unchanged; a sampler wrongly taken for a schedule sampler is an error, not
a different image."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_modulation_precompute import Reads  # counts the modulation layers' weight reads

from tools.checkpoints import dit as D
from tools.checkpoints import lora as L
from tools.comfy_paths import import_comfy_for_oracle, import_pack

import_comfy_for_oracle()

import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

import_pack()
native_model = importlib.import_module("qwenpix.nodes.native_model")
run_modulation = importlib.import_module("qwenpix.nodes.run_modulation")
patcher = importlib.import_module("qwenpix.nodes.patcher")
lora_mod = importlib.import_module("qwenpix.qwen_image_core.lora")
mmdit = importlib.import_module("qwenpix.qwen_image_core.mmdit")

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS, STEPS = 2, 4
N_LAYERS = 2 * LAYERS + 1  # img_mod.1 and txt_mod.1 per block, norm_out.linear


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = D.write_comfy(tmp_path_factory.mktemp("native_mod") / "dit.safetensors", D.tiny_config(num_layers=LAYERS))
    return mmdit.load_dit(path)


@pytest.fixture(scope="module")
def lora(dit, tmp_path_factory):
    path = L.write_lora(tmp_path_factory.mktemp("native_mod_lora") / "lora.safetensors", dit.config, "kohya")
    return lora_mod.load_lora(path, dit)  # img_mod.1 / txt_mod.1 are among its layers


def ksampler(dit, sampler: str, precompute: bool, cfg: float = 3.0, dtype=torch.float32, refs=False, lora=None,
             last_step=None, wrap=None):  # fmt: skip
    """KSampler's sampling (comfy.sample.sample) of the bridged MODEL; returns (latent, modulation weight reads).
    refs: a reference latent with "index_timestep_zero" (zero_cond_t: 2 x rows of timesteps); lora: a core Lora
    applied as ComfyUI weight patches; wrap: a DIFFUSION_MODEL wrapper to add."""
    model = native_model.dit_model(dit, dtype)
    if wrap is not None:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", wrap)
    if not precompute:
        model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, run_modulation.WRAPPER_KEY)
    if lora is not None:
        assert model.add_patches(patcher.lora_patches(lora), 0.8)
    g = torch.Generator().manual_seed(3)
    extra = {}
    if refs:
        ref = [torch.randn(1, 16, 1, 4, 6, generator=g)]
        extra = {"reference_latents": ref, "reference_latents_method": "index_timestep_zero"}
    pos = [[torch.randn(1, 7, dit.config.text_dim, generator=g), dict(extra)]]
    neg = [[torch.randn(1, 5, dit.config.text_dim, generator=g), dict(extra)]]  # another length: per-row text keys
    latent = torch.zeros(1, 16, 1, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    with Reads(dit) as r:
        out = comfy.sample.sample(model, noise, STEPS, cfg, sampler, "simple", pos, neg, latent, seed=3,
                                  disable_pbar=True, last_step=last_step)  # fmt: skip
    return out, r.count


# evaluations per run: one per step, heun two per step but the last (sigma 0: an Euler step)
@pytest.mark.parametrize("sampler, calls", [("euler", STEPS), ("euler_ancestral", STEPS), ("dpmpp_2m", STEPS),
                                            ("heun", 2 * STEPS - 1)])  # fmt: skip
def test_schedule_samplers_read_the_modulation_once_per_run_and_equal_the_per_call_path(dit, sampler, calls):
    pre, reads_pre = ksampler(dit, sampler, True)
    per, reads_per = ksampler(dit, sampler, False)
    assert torch.equal(pre, per)  # bit for bit
    assert (reads_pre, reads_per) == (N_LAYERS, calls * N_LAYERS)  # cond and uncond batched: one call each


@pytest.mark.parametrize("sampler", ["dpm_2", "dpmpp_2s_ancestral"])  # midpoints, off the schedule
def test_samplers_with_midpoints_compute_per_call_unchanged(dit, sampler):
    pre, reads_pre = ksampler(dit, sampler, True)
    per, reads_per = ksampler(dit, sampler, False)
    assert torch.equal(pre, per)
    assert reads_pre == reads_per > STEPS * N_LAYERS  # more evaluations than steps, each computes its own


def test_bf16_compute_is_bit_exact_too(dit):
    pre, reads_pre = ksampler(dit, "euler", True, dtype=torch.bfloat16)
    per, _ = ksampler(dit, "euler", False, dtype=torch.bfloat16)
    assert torch.equal(pre, per) and reads_pre == N_LAYERS


def test_references_at_timestep_zero_and_a_lora_are_bit_exact_too(dit, lora):
    assert any("_mod." in f.module for f in lora.factors)
    for kw in ({"refs": True}, {"lora": lora}):
        pre, reads_pre = ksampler(dit, "euler", True, **kw)
        per, reads_per = ksampler(dit, "euler", False, **kw)
        assert torch.equal(pre, per) and (reads_pre, reads_per) == (N_LAYERS, STEPS * N_LAYERS), kw
    assert not torch.equal(pre, ksampler(dit, "euler", True)[0])  # the LoRA is applied


def test_a_run_ending_above_sigma_0_evaluates_its_last_sigma_per_call(dit):
    # KSamplerAdvanced's "return with leftover noise": heun's last step evaluates sigmas[-1] (not 0, no table entry)
    pre, reads_pre = ksampler(dit, "heun", True, last_step=2)
    per, reads_per = ksampler(dit, "heun", False, last_step=2)
    assert torch.equal(pre, per) and (reads_pre, reads_per) == (2 * N_LAYERS, 4 * N_LAYERS)  # table + 1 per call


def test_no_host_reads_inside_the_denoiser(dit):
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class HostReads(TorchDispatchMode):  # a device-to-host scalar read (.item(), bool(t)): a sync on a GPU
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            HostReads.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    def counted(executor, *args, **kwargs):  # around each forward of the diffusion model (table made in the first)
        with HostReads():
            return executor(*args, **kwargs)

    _, reads = ksampler(dit, "euler", True, wrap=counted)
    assert reads == N_LAYERS and HostReads.n == 0


def test_cfg_1_precomputes_for_its_rows(dit):
    pre, reads_pre = ksampler(dit, "euler", True, cfg=1.0)  # cond only: a batch of 1 row
    per, _ = ksampler(dit, "euler", False, cfg=1.0)
    assert torch.equal(pre, per) and reads_pre == N_LAYERS


def test_a_sampler_off_its_schedule_taken_for_a_schedule_sampler_is_an_error(dit, monkeypatch):
    import comfy.k_diffusion.sampling as kd  # noqa: PLC0415

    monkeypatch.setattr(run_modulation, "SCHEDULE_SAMPLERS", run_modulation.SCHEDULE_SAMPLERS | {kd.sample_dpm_2})
    with pytest.raises(RuntimeError, match="outside its step's schedule entry"):
        ksampler(dit, "dpm_2", True)


@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_every_ksampler_sampler_equals_the_per_call_path(dit, sampler):
    pre, reads_pre = ksampler(dit, sampler, True)
    per, reads_per = ksampler(dit, sampler, False)
    assert torch.equal(pre, per)
    scheduled = comfy.samplers.sampler_object(sampler).sampler_function in run_modulation.SCHEDULE_SAMPLERS
    assert reads_pre == (N_LAYERS if scheduled else reads_per)


def test_no_table_under_a_torch_compile_trace(dit, monkeypatch):
    # TorchCompileModel compiles the whole diffusion model: the step's entry would become a guard (a recompile per
    # step), so a trace takes the per-call path (TorchCompileModel on our MODEL end to end: test_e2e_sampler_node)
    run = run_modulation.RunModulation([0.5])
    img, t = torch.zeros(1, 16, 4, 4), torch.full((1,), 0.5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert run_modulation.step_modulation({run_modulation.KEY: run}, dit, t, img, [], None) is None
    monkeypatch.undo()
    assert run_modulation.step_modulation({run_modulation.KEY: run}, dit, t, img, [], None) is not None
    assert not bool(run.mismatch) and list(run.tables) == [(1, False, torch.float32, img.device)]
