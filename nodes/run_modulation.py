"""AdaLN modulation precomputed for a ComfyUI sampling run on the bridged native MODEL (issue 13, 3).

`qwen_image_core.modulation` computes every step's modulation once per run, so the modulation weights (a third
of the DiT's bytes) are read once, not per step. In the core sampler the step index is known on the host. Inside
ComfyUI a sampler passes each step's sigma only as a device tensor, and reading it would wait for the device, so
the step is taken from the run itself:

- `sampler_sample_wrapper` (a SAMPLER_SAMPLE wrapper) sees the run's sigmas before the sampler starts; it reads
  them to the host once, and follows the steps through the sampler's callback (`i` of each finished step);
- only samplers that evaluate the model at the schedule's sigmas, in step order, take the table
  (`SCHEDULE_SAMPLERS`, read from ComfyUI 0.3.75's k-diffusion code); dpm_2, heunpp2, dpmpp_2s / dpmpp_sde,
  seeds, uni_pc, dpm_fast / adaptive, custom samplers and a non-zero `s_churn` evaluate midpoints or look ahead,
  and dpmpp_2m_sde / 3m_sde, er_sde and sa_solver move the first sigma of a flow model off 1
  (`offset_first_sigma_for_snr`): these keep the per-call modulation;
- the forward (`NativeDiT`) asks `RunModulation.step` for the entry; the table is made at the first forward of
  each batch size / dtype / device (its rows must equal the forward's, so the numbers are bit for bit the
  per-call ones);
- each forward also compares its timestep with the entry's on the device (no sync) and the run checks that
  flag once after the sampler returns: a mismatch is an error, never a silently different image.

Per call (not precomputed) also: Qwen-Image-Layered (`modulation.supported`), a native matmul mode, weight hooks
on the conditioning (per-entry weights), `double_block` replacements (they may change the block's `vec`), and the
whole diffusion model compiled by TorchCompileModel (the loader's per-block compile keeps the table).

The device bytes. `outer_sample_wrapper` (an OUTER_SAMPLE wrapper: it runs before ComfyUI loads the model) makes
the same decision for the run and, where it precomputes, asks the load for a plan without the modulation weights
(`patcher.Placement.next_run`: `plan_dit(modulation=True)`, the table's bytes counted instead, the weights left
on the host and read once per run for the table), so their bytes hold more resident blocks under ComfyUI's
budget. A run that computes per call gets them on the device as before; the same loaded model switches between
the two kinds, moving only the difference (one host copy of streamed blocks serves both). Should a forward still
compute per call while they are on the host, the executor copies each layer to the device for that call.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import comfy.k_diffusion.sampling as kd
import comfy.patcher_extension
import comfy.samplers
import torch

from ..qwen_image_core import modulation

KEY = "qwenpix_modulation"  # transformer_options entry holding the run's RunModulation
POLICY = "qwenpix_modulation_policy"  # transformer_options entry: the run's decision ("" or why per call)
WRAPPER_KEY = "qwenpix_modulation"
COMPILE_KEY = "torch.compile"  # TorchCompileModel's APPLY_MODEL wrapper (comfy_api.torch_helpers)
# k-diffusion samplers (0.3.75) whose model evaluations between the callbacks of steps i - 1 and i are all at
# sigmas[i] (checked in their code; heun: its second evaluation, at sigmas[i + 1], follows step i's callback)
SCHEDULE_SAMPLERS = frozenset(
    getattr(kd, f"sample_{name}")
    for name in (
        "euler", "heun", "euler_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp", "lms", "dpmpp_2m",
        "dpmpp_2m_cfg_pp", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
        "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
        "gradient_estimation_cfg_pp",
    )
)  # fmt: skip


class RunModulation:
    """One sampling run's modulation tables; `at` is the step the next forwards belong to."""

    def __init__(self, timesteps: list[float]):
        self.timesteps = timesteps  # host floats: the model timestep of each step (sigmas[:-1], as the DiT sees)
        self.at = 0
        self.tables: dict[tuple, modulation.ModulationTable] = {}  # (rows, zero_cond, dtype, device) -> table
        self.reads: Counter = Counter()  # modulation layer -> weight reads in this run
        self.mismatch: torch.Tensor | None = None  # device flag: a forward's timestep was not its step's

    def step(self, dit, timestep: torch.Tensor, rows: int, zero_cond: bool, dtype: torch.dtype,
             device: torch.device) -> modulation.StepModulation | None:  # fmt: skip
        """This forward's precomputed entry (the table made at the first forward of this shape), or None past the
        schedule's end."""
        if not 0 <= self.at < len(self.timesteps):
            return None
        key = (rows, zero_cond, dtype, device)
        if key not in self.tables:
            table = modulation.precompute(dit, self.timesteps, rows, dtype, device, zero_cond)
            self.reads.update(table.reads)
            self.tables[key] = table
        entry = self.tables[key].steps[self.at]
        wrong = (timestep.reshape(-1).float() != entry.sigma).any()  # on the device: no sync
        self.mismatch = wrong if self.mismatch is None else self.mismatch | wrong
        return entry

    def verify(self) -> None:
        """After the sampler: one host read of the mismatch flag (the run has synchronised anyway)."""
        if self.mismatch is not None and bool(self.mismatch):
            raise RuntimeError(
                "QwenPix: a model call of this sampler was at a sigma outside its step's schedule entry, so the "
                "precomputed AdaLN modulation did not apply; please report the sampler (it needs per-call modulation)"
            )


@dataclass(frozen=True)
class HostRun:
    """A run whose modulation is precomputed, as the placement plans it: `steps` table entries for forwards of
    up to `rows` rows (`plan_dit(modulation=True)` counts the table's bytes from these)."""

    steps: int
    rows: int


def why_per_call(sampler, guider, diffusion_model, matmul: str | None = None) -> str:
    """'' when this run can take the precomputed modulation, else the reason it is computed per call. matmul: the
    run's matmul mode where the MODEL's object patches are not applied yet (before the load)."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER) or sampler.sampler_function not in SCHEDULE_SAMPLERS:
        return "the sampler evaluates the model between the schedule's sigmas"
    if sampler.extra_options.get("s_churn", 0.0):
        return "s_churn moves the evaluated sigmas off the schedule"
    if not hasattr(diffusion_model, "core"):
        return "the diffusion model is not the QwenPix DiT"
    why = modulation.supported(diffusion_model.core)
    if why:
        return why
    if (matmul or getattr(diffusion_model, "matmul", "off")) != "off":
        return "a native matmul mode computes the modulation layers with its own kernels"
    conds = getattr(guider, "conds", None) or {}
    if any(c.get("hooks") for entries in conds.values() for c in entries):
        return "weight hooks on the conditioning change the weights per entry"
    options = (getattr(guider, "model_options", None) or {}).get("transformer_options", {})
    if options.get("patches_replace", {}).get("dit"):
        return "a double_block replacement may change the blocks' timestep input"
    if options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).get(COMPILE_KEY):
        return "TorchCompileModel compiles the whole diffusion model (a table entry per step would recompile)"
    return ""


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """OUTER_SAMPLE wrapper (before ComfyUI loads the model): the run's decision, and where it precomputes, a
    load that leaves the modulation weights on the host (`patcher.Placement.next_run`)."""
    guider = executor.class_obj
    patcher = guider.model_patcher
    matmul = patcher.object_patches.get("diffusion_model.matmul")
    why = why_per_call(sampler, guider, patcher.model.diffusion_model, matmul) or (
        "" if len(sigmas) > 1 else "no steps"
    )
    guider.model_options.setdefault("transformer_options", {})[POLICY] = why
    placement = getattr(patcher.model, "qwenpix_placement", None)
    hosts = not why and placement is not None and bool(getattr(placement, "host_modules", ()))
    if hosts:  # forwards of up to every conditioning entry batched (cond + uncond, ConditioningCombine entries)
        entries = sum(len(c) for c in (guider.conds or {}).values()) or 1
        placement.next_run = HostRun(len(sigmas) - 1, noise.shape[0] * entries)
    try:
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
    finally:
        if hosts:
            placement.next_run = None


def sampler_sample_wrapper(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: the run's modulation precomputed where the sampler stays on the schedule (the
    OUTER_SAMPLE wrapper's decision, made before the load; this one's own where that did not run)."""
    options = extra_args.get("model_options", {}).get("transformer_options")
    why = (options or {}).get(POLICY)
    if why is None:
        why = why_per_call(executor.class_obj, guider, guider.inner_model.diffusion_model)
    if why or options is None or len(sigmas) < 2:
        logging.debug("QwenPix: AdaLN modulation per call (%s)", why or "no steps")
        return executor(guider, sigmas, extra_args, callback, *args, **kwargs)
    # the DiT's timestep of each step, as ComfyUI computes it (model_sampling.timestep), read once per run
    timesteps = guider.inner_model.model_sampling.timestep(sigmas[:-1]).float().tolist()
    run = RunModulation(timesteps)

    def on_step(i, denoised, x, total):
        run.at = i + 1
        if callback is not None:
            callback(i, denoised, x, total)

    options[KEY] = run
    try:
        out = executor(guider, sigmas, extra_args, on_step, *args, **kwargs)
    finally:
        options.pop(KEY, None)
    run.verify()
    return out


def step_modulation(options: dict, dit, timestep, img: torch.Tensor, refs, zero_cond_t):
    """The forward's precomputed entry from the run in `options`, or None (per call): none for this run, a
    `double_block` replacement that could change the block's timestep input, or a torch.compile trace."""
    run = options.get(KEY)
    if run is None or options.get("patches_replace", {}).get("dit") or torch.compiler.is_compiling():
        return None  # (under TorchCompileModel the step's entry would be a guard: a recompile per step)
    zero = bool((dit.zero_cond_t if zero_cond_t is None else zero_cond_t) and refs)  # as MMDiT.forward decides
    return run.step(dit, timestep, img.shape[0], zero, img.dtype, img.device)
