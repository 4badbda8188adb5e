"""ComfyUI's ModelPatcher for QwenPix models: registered with ComfyUI's model management at their true size,
placed on the GPU by qwen_image_core's planner and executor, patched exactly.

Placement. ComfyUI decides how many bytes a model may hold on its device (`load_models_gpu`): all of it,
a budget (`lowvram_model_memory`), more later (`partially_load`), less when another model needs the room
(`partially_unload`, from `free_memory`), or nothing (`detach`). `Placement` turns each budget into a plan
(resident blocks plus a staging ring that streams the others from pinned host memory) and moves only what
changed between plans. ComfyUI's budget already leaves room for the activations it asked
`memory_required` about and for its reserve, so plans here keep no reserve of their own. On the CPU
nothing moves. A step that runs out of memory re-plans with half the resident blocks and runs once more.

Patches. ComfyUI keeps weight patches (LoRAs, merges, diffs; per-conditioning weight hooks) in the
ModelPatcher and merges them into the weights when it loads a model, re-quantising float8 bases. Here they
are applied at each layer's weight cast instead, in float32, from the untouched stored weights: plain LoRAs
as low-rank factors, every other patch through ComfyUI's own `comfy.lora.calculate_weight`. Exact on float8
and bf16 bases; unpatching restores the base bit for bit because it was never written.
(`force_patch_weights`, used when saving or merging a model, does merge, with ComfyUI's own code.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import comfy.weight_adapter
import torch
from torch import nn

from ..qwen_image_core.offload_plan import Card, Plan, PlanError, detect_card
from ..qwen_image_core.ops import lora_to
from ..qwen_image_core.placement import OOM_ERRORS, Offloaded
from ..qwen_image_core.transfer import Transfer, default_transfer, measure_h2d_gbps

WRAPPER_KEY = "qwenpix_oom_replan"


def pin_cap() -> int:
    """Page-locked bytes our host copies may take: what ComfyUI's own rule (MAX_PINNED_MEMORY: a share of the
    RAM, smaller on Windows; none when pinning is disabled) leaves after ComfyUI's own pins."""
    cap = getattr(mm, "MAX_PINNED_MEMORY", -1)
    return max(0, int(cap) - int(getattr(mm, "TOTAL_PINNED_MEMORY", 0))) if cap > 0 else 0


def comfy_transfer(device: torch.device) -> Transfer:
    return default_transfer(device, max_pinned=pin_cap() if device.type == "cuda" else None)


_BANDWIDTH: dict[str, float] = {}  # device -> measured pinned host-to-device GB/s (measured once per process)


def measured_card(device: torch.device) -> Card:
    """The device's Card, with the host-to-device bandwidth measured at first use (not assumed)."""
    key = str(device)
    if key not in _BANDWIDTH:
        try:
            _BANDWIDTH[key] = measure_h2d_gbps(device)
        except (RuntimeError, AssertionError):  # no pinned memory or no timing events: the usual x16 Gen4 figure
            _BANDWIDTH[key] = 25.0
    return detect_card(device, _BANDWIDTH[key])


@dataclass
class DeviceSeam:
    """How placements reach a device; tests swap in a CPU stand-in that accounts the bytes of a fake GPU."""

    transfer: Callable[[torch.device], Transfer] = comfy_transfer
    card: Callable[[torch.device], Card] = measured_card


SEAM = DeviceSeam()  # the host seam's one instance


class Placement:
    """Where one model's blocks live for a device budget, shared by every clone of its patcher.

    plan_for(card, budget bytes, max_resident) -> Plan. `host_modules`: modules a run may leave on the host (the
    DiT's modulation layers when the run precomputes them): `next_run` is what the next load is for (set by the
    run's OUTER_SAMPLE wrapper, `run_modulation.outer_sample_wrapper`; None: they are placed as the rest),
    `run` what the placed plan was made for (plan_for reads it; kept when ComfyUI only shrinks or grows the plan).
    """

    def __init__(self, module: nn.Module, blocks: Sequence[nn.Module], plan_for: Callable[..., Plan],
                 host_modules: Sequence[nn.Module] = ()):  # fmt: skip
        self.module, self.blocks, self.plan_for = module, blocks, plan_for
        self.host_modules = tuple(host_modules)
        self.next_run = None
        self.run = None
        self.offloaded: Offloaded | None = None
        self.last_plan = ""

    @property
    def placed_bytes(self) -> int:
        """Bytes moved to the device by placements so far (tests assert on it)."""
        return 0 if self.offloaded is None else self.offloaded.placed_bytes

    @property
    def streams(self) -> bool:
        """Whether some blocks stream (ComfyUI's "lowvram" state)."""
        return self.offloaded is not None and self.offloaded.attached and bool(self.offloaded.plan.streamed)

    @property
    def device(self) -> torch.device | None:
        """Where the placed weights compute (the transfer's device), or None when nothing is placed."""
        return self.offloaded.transfer.device if self.offloaded is not None and self.offloaded.attached else None

    @property
    def held(self) -> int:
        """Device bytes held now (resident weights and the staging ring)."""
        return self.offloaded.plan.device_bytes if self.offloaded is not None and self.offloaded.attached else 0

    def place(self, device: torch.device | None, budget: float | None, max_resident: int | None = None) -> int:
        """Hold at most `budget` bytes on `device` (None: no limit); returns the bytes held."""
        if device is None or torch.device(device).type == "cpu":
            return 0
        if self.offloaded is None:
            transfer = SEAM.transfer(torch.device(device))
            self.offloaded = Offloaded(self.module, self.blocks, None, transfer, tail=self.host_modules)
        self.offloaded.skip = self.host_modules if self.run is not None else ()
        card, limit = SEAM.card(torch.device(device)), 1 << 62 if budget is None else max(0, int(budget))

        def planner(free, mr):
            try:
                return self.plan_for(card, limit, mr)
            except PlanError:  # not even the streaming minimum fits: take the minimum, ComfyUI's budget is soft
                return self.plan_for(card, 1 << 62, 0)

        self.offloaded.planner = planner
        self.last_plan = self.offloaded.replan(max_resident).explain()
        return self.held

    def release(self, host: bool = False) -> None:
        """Give the device memory back; host=True also the pinned host copies (kept otherwise, for the next
        placement)."""
        if self.offloaded is not None:
            self.offloaded.detach(release_host=host)
            self.offloaded.transfer.empty_cache()

    @property
    def can_shrink(self) -> bool:
        return self.offloaded is not None and self.offloaded.attached and bool(self.offloaded.plan.resident)

    def shrink(self) -> None:
        """After an out-of-memory error: keep half the resident blocks (at the next placement too)."""
        if self.offloaded is not None and self.offloaded.attached:
            self.offloaded.transfer.empty_cache()
            self.offloaded.replan(max_resident=len(self.offloaded.plan.resident) // 2)
            self.last_plan = self.offloaded.plan.explain()


def oom_replan_wrapper(placement: Placement):
    """An APPLY_MODEL wrapper: a model call that runs out of memory re-plans once and is repeated (the retry
    runs after the failed call's tensors are gone, outside the exception handler)."""

    def wrapper(executor, *args, **kwargs):
        failed = None
        try:
            return executor(*args, **kwargs)
        except OOM_ERRORS as e:
            if not placement.can_shrink:  # nothing of ours to move off the device: ComfyUI reports it
                raise
            failed = f"{type(e).__name__}"
        before = placement.last_plan
        placement.shrink()
        logging.warning("QwenPix: out of memory in a model call (%s); re-planned (%s -> %s), retrying once",
                        failed, before, placement.last_plan)  # fmt: skip
        return executor(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------
# Patches applied at the weight cast
# ---------------------------------------------------------------------------------------------------------


def _lora_factors(entries) -> list | None:
    """[(down, up, scale)] when every patch of a key is a plain LoRA (no DoRA, mid, reshape, offset,
    function, base-strength change), else None."""
    out = []
    for strength, adapter, strength_model, offset, function in entries:
        if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter) or strength_model != 1.0:
            return None
        up, down, alpha, mid, dora, reshape = adapter.weights
        if mid is not None or dora is not None or reshape is not None or offset is not None or function is not None:
            return None
        if up.ndim != 2 or down.ndim != 2:
            return None
        out.append((down, up, strength * (1.0 if alpha is None else float(alpha) / down.shape[0])))
    return out


def _calculate(entries, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: comfy.lora.calculate_weight(entries, w, key, intermediate_dtype=torch.float32)


def install_patches(root: nn.Module, patches: dict[str, list], factor_loras: bool = True) -> int:
    """Make exactly `patches` ({state-dict key: ComfyUI patch list}) active at the weight casts under
    `root`; returns how many keys were installed. Raises if a key names no patchable tensor.

    factor_loras: plain LoRAs run beside the layer as factors (fast); False merges them at the cast through
    ComfyUI's `calculate_weight` (ComfyUI's own float32 numerics, bit for bit)."""
    clear_patches(root)
    for key, entries in patches.items():
        if not entries:
            continue
        path, attr = key.rsplit(".", 1)
        module = comfy.utils.get_attr(root, path)
        slot = {"weight": "weight_fns", "bias": "bias_fns"}.get(attr)
        if slot is None or not hasattr(module, slot):
            raise ValueError(f"cannot patch {key}: not a weight or bias of a QwenPix layer")
        factors = _lora_factors(entries) if factor_loras and attr == "weight" and hasattr(module, "lora") else None
        if factors is not None:
            module.lora = tuple(factors)
        else:
            setattr(module, slot, (_calculate(entries, key),))
    return sum(1 for e in patches.values() if e)


def lora_patches(lora, prefix: str = "diffusion_model.") -> dict:
    """A qwen_image_core `Lora` as ComfyUI weight patches ({key: patch}) for `ModelPatcher.add_patches`: the same
    patches LoraLoaderModelOnly makes of the file (`comfy.lora.load_lora`): a LoRAAdapter per low-rank pair (with
    its DoRA scale), LoKrAdapter, LoHaAdapter, ("diff", (delta,)) for full weight and bias deltas. So they apply
    to our MODEL and to ComfyUI's own alike."""
    out = {}
    for f in lora.factors:
        alpha = f.alpha if f.alpha is not None else None if f.scale == 1.0 else f.scale * f.down.shape[0]
        key = f"{prefix}{f.module}.weight"
        out[key] = comfy.weight_adapter.LoRAAdapter(set(f.keys), (f.up, f.down, alpha, None, None, None))
    for t in lora.terms:
        out[f"{prefix}{t.module}.{t.target}"] = _comfy_patch(t)
    return out


def _comfy_patch(term):
    """One `LoraTerm` as the patch ComfyUI's loader builds for the same keys."""
    t, keys = term.tensors, set(term.keys)
    if term.kind == "diff":
        return ("diff", (t["diff"],))
    if term.kind == "lora":
        return comfy.weight_adapter.LoRAAdapter(keys, (t["up"], t["down"], term.alpha, None, term.dora_scale, None))
    if term.kind == "lokr":
        weights = (t.get("w1"), t.get("w2"), term.alpha, t.get("w1_a"), t.get("w1_b"), t.get("w2_a"), t.get("w2_b"),
                   None, term.dora_scale)  # fmt: skip
        return comfy.weight_adapter.LoKrAdapter(keys, weights)
    if term.kind == "loha":
        weights = (t["w1_a"], t["w1_b"], term.alpha, t["w2_a"], t["w2_b"], None, None, term.dora_scale)
        return comfy.weight_adapter.LoHaAdapter(keys, weights)
    raise ValueError(f"no ComfyUI patch for a {term.kind} LoRA term")


def clear_patches(root: nn.Module) -> None:
    for m in root.modules():
        for slot in ("lora", "weight_fns", "bias_fns"):
            if getattr(m, slot, None):
                setattr(m, slot, ())


# ---------------------------------------------------------------------------------------------------------
# The patcher
# ---------------------------------------------------------------------------------------------------------


class QwenPixPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose `load` places through `Placement` and installs patches at the weight cast.

    `model.qwenpix_placement` (set by `placed_patcher`) is shared by all clones: a clone with other LoRAs
    reuses the weights already on the device.
    """

    def __repr__(self) -> str:  # ComfyUI sends str(input) with an error; the default repr names the pack's path
        return f"QwenPixPatcher({self.get_attachment('qwenpix_name')!r}, {len(self.patches)} patched weights)"

    @property
    def placement(self) -> Placement:
        return self.model.qwenpix_placement

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        full = full_load or not lowvram_model_memory or lowvram_model_memory >= 1e30  # ComfyUI: 0 = everything
        self._load(device_to, None if full else lowvram_model_memory, force_patch_weights, full_load)

    def _load(self, device_to, budget: float | None, force_patch_weights=False, full_load=False):
        """Install this patcher's patches and hold at most `budget` bytes (None: all) on `device_to`."""
        with self.use_ejected():
            self.unpatch_hooks()
            lora_bytes = 0
            if force_patch_weights:  # saving / merging: real merged weights, as ComfyUI makes them
                self.placement.release()
                clear_patches(self.model)
                for key in self.patches:
                    self.patch_weight_to_device(key)
            else:
                lora_bytes = self._install(self.patches)
            max_resident = 0 if mm.vram_state == mm.VRAMState.NO_VRAM else None
            self.placement.run = self.placement.next_run  # a load is for the run that asked (None: any use)
            room = None if budget is None else max(0, budget - lora_bytes)  # the factors live there too
            held = self.placement.place(device_to, room, max_resident)
            self._factors_to_compute_device()
            on_cpu = device_to is None or torch.device(device_to).type == "cpu"
            self.model.model_loaded_weight_memory = self.model_size() if on_cpu else held + lora_bytes
            self.model.model_lowvram = self.placement.streams
            self.model.model_offload_buffer_memory = 0
            self.model.lowvram_patch_counter = 0
            self.model.device = device_to
            self.model.current_weight_patches_uuid = self.patches_uuid
            for callback in self.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_LOAD):
                callback(self, device_to, 0 if budget is None else budget, force_patch_weights, full_load)
            self.apply_hooks(self.forced_hooks, force_apply=True)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            used = self.loaded_size()
            self.patch_model(load_weights=False)
            budget = None if extra_memory >= 1e30 else max(0, used + extra_memory)
            self._load(device_to, budget, force_patch_weights, full_load=budget is None)
            return max(0, self.loaded_size() - used)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        used = self.loaded_size()
        device = self.model.device
        if device is None or torch.device(device).type == "cpu":
            return 0
        held = self.placement.place(device, max(0, used - memory_to_free))
        self.model.model_loaded_weight_memory = held
        self.model.model_lowvram = True
        logging.info("QwenPix: shrank to a streaming plan, %.0f MB freed: %s", (used - held) / 2**20,
                     self.placement.last_plan)  # fmt: skip
        return used - held

    def _install(self, patches: dict) -> int:
        """Install `patches` at the weight casts; returns the bytes their LoRA factors take in the compute dtype.
        Under "ComfyUI native" positions LoRAs are merged at the cast in float32 instead of running beside the
        layer: ComfyUI's own arithmetic, bit for bit."""
        inner = getattr(self.model, "diffusion_model", None)
        install_patches(self.model, patches, factor_loras=getattr(inner, "positions", None) != "comfyui")
        size = torch.empty((), dtype=self._compute_dtype()).element_size()
        return sum((d.numel() + u.numel()) * size for m in self.model.modules() for d, u, _ in getattr(m, "lora", ()))

    def _compute_dtype(self) -> torch.dtype:
        return getattr(self.model, "manual_cast_dtype", None) or self.model_dtype() or torch.float32

    def _factors_to_compute_device(self) -> None:
        """The installed LoRA factors where the layers compute, in the compute dtype: moved once per load."""
        lora_to(self.model, self.placement.device or "cpu", self._compute_dtype())

    def patch_hooks(self, hooks):
        """ComfyUI's weight hooks (CreateHookLora... on a conditioning) for the entries being computed: their
        patches join the MODEL's own at the weight cast, as exact as those (ComfyUI writes them into the weights)."""
        with self.use_ejected():
            patches = dict(self.patches)
            for key, extra in self.get_combined_hook_patches(hooks).items() if hooks is not None else ():
                patches[key] = [*patches.get(key, []), *extra]
            self._install(patches)
            self._factors_to_compute_device()
            self.current_hooks = hooks

    def unpatch_hooks(self, whitelist_keys_set=None) -> None:
        if self.current_hooks is not None and self.model.current_weight_patches_uuid == self.patches_uuid:
            self._install(self.patches)  # back to the MODEL's own patches
            self._factors_to_compute_device()
        self.current_hooks = None

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        self.eject_model()
        if unpatch_weights:
            self.unpatch_hooks()
            clear_patches(self.model)
            for key, bk in self.backup.items():  # only after force_patch_weights
                comfy.utils.set_attr_param(self.model, key, bk.weight)
            self.backup.clear()
            self.model.current_weight_patches_uuid = None
            if device_to is not None:  # ComfyUI unloads the model: its device memory and pinned copies go
                self.placement.release(host=True)
                self.model.device = device_to
                self.model.model_loaded_weight_memory = 0
                self.model.model_lowvram = False
        for key, old in self.object_patches_backup.items():
            comfy.utils.set_attr(self.model, key, old)
        self.object_patches_backup.clear()


def placed_patcher(model: nn.Module, placed: nn.Module, blocks: Sequence[nn.Module], plan_for: Callable[..., Plan],
                   load_device=None, offload_device=None, patcher_class=None,
                   host_modules: Sequence[nn.Module] = ()) -> QwenPixPatcher:  # fmt: skip
    """A QwenPixPatcher (or `patcher_class`, a subclass) for `model` (a ComfyUI BaseModel, or a holder module)
    whose module `placed` (the one ComfyUI calls; its `blocks` planned by `plan_for`) is placed on the device;
    `host_modules`: see `Placement`."""
    model.qwenpix_placement = Placement(placed, blocks, plan_for, host_modules)
    patcher = (patcher_class or QwenPixPatcher)(
        model,
        load_device=mm.get_torch_device() if load_device is None else load_device,
        offload_device=mm.unet_offload_device() if offload_device is None else offload_device,
    )
    patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, oom_replan_wrapper(model.qwenpix_placement)
    )
    return patcher
