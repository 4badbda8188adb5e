"""Sequence parallel (Ulysses, `qwen_image_core/parallel`) on 1, 2 and 4 GPUs: predicted seconds per DiT step.

For each GPU kind and link, weight storage and resolution (CFG batched, 256 text tokens), per rank:
  compute   the planner's time model (costs.dit_block_flops' terms, card TFLOPS x MFU) for this rank's work:
            the projections and MLPs of its ceil(N / P) image tokens and of all L text tokens (the text is on
            every rank), attention of the whole sequence for H / P heads
  a2a       the bytes each rank sends per block (q, k, v and the output of its image shard: (P - 1) / P of
            4 x rows x ceil(N/P) x D; the text output heads: (P - 1) x rows x L x D / P; bf16), over the link's
            one-direction bandwidth, plus a latency per collective (3 per block); not hidden behind compute
            (attention needs its inputs), and the final all-gather of the image stream once per step
  weights   every rank holds the whole DiT: where it does not fit (24 GB cards in bf16), the offload planner
            (offload_plan.plan_blocks) streams blocks behind compute + a2a; over PCIe without peer-to-peer the
            all-to-all crosses the same host link, so the weights get the link only for the compute share
  s/step    compute + a2a (+ exposed copies), and the speedup over the same card alone
The real 20B DiT is built on the meta device (no memory). Links (one direction, per GPU, effective):
  PCIe 4.0 x16, no P2P (RTX 4090; 3090 without a bridge): through pinned host memory, 12.5 GB/s (derived:
      D2H then H2D at the planner's 25 GB/s), 30 us per collective
  NVLink bridge (RTX 3090, pairs only): 56 GB/s (4 links x 14 GB/s), 10 us
  NVLink 4 + NVSwitch (H100 SXM): 350 GB/s (of 450 nominal; NCCL all-to-all bus bandwidth), 10 us
With 4 GPUs streaming bf16 weights, each needs its own x16 link and the host RAM serves all four (not modelled).
Placement across GPUs (one process, `qwen_image_core.multi_device_plan`, the loader's `devices`): the blocks in
contiguous ranges, one GPU after the other (no speed-up from the extra compute), the residual streams crossing
each boundary over the link; the rows compare it with one card streaming what does not fit.
Published (anchors_performance A5): diffusers bf16 Qwen-Image 1024^2, 50 steps, true CFG 4 on H100 18.49 s per
image, 2x H100 Ulysses 12.81 s (1.44x; whole images: text encoder, VAE and host overheads included).

    .venv/bin/python bench/bench_multigpu.py [--mfu 0.5] [--reserve-gib 1.0] [--text 256]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core import multi_device_plan as MP  # noqa: E402
from qwen_image_core import offload_plan as P  # noqa: E402
from qwen_image_core.costs import card_from_properties  # noqa: E402
from tools.checkpoints import dit as W  # noqa: E402

FREE_LOSS = 600 << 20  # CUDA context + desktop (as bench_offload): free VRAM = total - 0.6 GiB
BYTES = 2  # bf16 activations on the wire
D, F = 3072, 12288  # hidden, MLP width


@dataclass(frozen=True)
class Link:
    name: str
    gbps: float  # GB/s one direction per GPU, effective
    latency_s: float  # per collective
    through_host: bool  # shares the host link with weight streaming
    max_gpus: int = 8


PCIE = Link("PCIe 4.0, no P2P", 12.5, 30e-6, True)
BRIDGE = Link("NVLink bridge", 56.0, 10e-6, False, max_gpus=2)
NVSWITCH = Link("NVLink4 NVSwitch", 350.0, 10e-6, False)
SYSTEMS = [  # (card, links, storages)
    (P.CARDS["24GB"], (PCIE,), ("fp8", "bf16")),
    (card_from_properties("RTX 3090", 24 * P.GiB, 82, 1_695_000, 8.6), (PCIE, BRIDGE), ("fp8", "bf16")),
    (card_from_properties("H100 SXM", 80 * P.GiB, 132, 1_830_000, 9.0, h2d_gbps=50.0), (NVSWITCH,), ("bf16",)),
]


def rank_flops(wl: P.DiTWorkload, world: int) -> float:
    """One block's FLOPs on one rank: costs.dit_block_flops' linear, attention and modulation terms with the
    image tokens split and the text on every rank (world 1: exactly dit_block_flops)."""
    n_img, n_txt = wl.image_tokens, wl.text_tokens
    local = n_txt + math.ceil(n_img / world)
    linear = 2 * (4 * D * D + 2 * D * F) * local
    attention = 4 * (n_img + n_txt) ** 2 * D / world
    return wl.rows * (linear + attention + 2 * 2 * 6 * D * D)


def a2a_bytes(wl: P.DiTWorkload, world: int) -> float:
    """Bytes one rank sends per block (as many arrive): its image shard's q, k, v and output, the text heads."""
    ni = math.ceil(wl.image_tokens / world)
    image = (world - 1) / world * 4 * wl.rows * ni * D * BYTES
    text = (world - 1) * wl.rows * wl.text_tokens * D / world * BYTES
    return image + text


def predict(card, link: Link, model, wl: P.DiTWorkload, world: int, reserve: int):
    """(compute s, a2a s, total s per step, plan) for one rank of `world`."""
    sizes, fixed = P.split_blocks(model, model.transformer_blocks)
    compute = rank_flops(wl, world) / (card.tflops * 1e12 * card.mfu)
    a2a = 0.0
    if world > 1:
        a2a = a2a_bytes(wl, world) / (link.gbps * 1e9) + 3 * link.latency_s
    local = wl.text_tokens + math.ceil(wl.image_tokens / world)
    act = int(P.dit_activation_bytes(wl, D, F) * local / wl.tokens)  # the estimate scales with the tokens held
    h2d = card.h2d_gbps * P.GB * (compute / (compute + a2a) if link.through_host else 1.0)
    plan = P.plan_blocks(sizes, fixed, card.vram - FREE_LOSS, reserve, act, compute + a2a, h2d,
                         storage=P.storage_label(model.transformer_blocks))  # fmt: skip
    gather = 0.0 if world == 1 else (world - 1) * wl.rows * math.ceil(wl.image_tokens / world) * D * BYTES
    total = plan.step_s + gather / (link.gbps * 1e9)
    n = len(sizes)
    return compute * n, a2a * n, total, plan


def placement_rows(mfu: float, reserve: int, models: dict) -> None:
    """The bf16 DiT spread over 1 and 2 cards of a kind (`multi_device_plan.plan_dit_devices`), predicted s/step."""
    print()
    print("Placement across GPUs (blocks spread, GPUs one after another; activations over the link per boundary)")
    head = f"{'GPU':<19}{'link':<18}{'weights':<8}{'size':<6}{'GPUs':>4}{'s/step':>8}"
    print(head + "  per GPU: blocks, resident / streamed")
    print("-" * (len(head) + 50))
    x8 = replace(P.CARDS["16GB"], name="RTX 4080 16 GB x8", h2d_gbps=12.5)  # a second slot often runs x8
    for card, links in [(SYSTEMS[0][0], (PCIE,)), (SYSTEMS[1][0], (PCIE, BRIDGE)), (x8, (PCIE,))]:
        card = replace(card, mfu=mfu)  # bf16 (41 GB) fits none of these cards alone
        for link in links:
            for px in (1328, 2048):
                wl = P.DiTWorkload(px, px, cfg=True)
                for world in (1, 2):
                    devices = [MP.DeviceBudget(f"cuda:{i}", card.vram - FREE_LOSS, card) for i in range(world)]
                    row = f"{card.name:<19}{link.name:<18}{'bf16':<8}{px:<6}{world:>4}"
                    try:
                        plan = MP.plan_dit_devices(models["bf16"], devices, wl, reserve, link_gbps=link.gbps)
                    except P.PlanError:
                        print(row + "  does not fit")
                        continue
                    where = "; ".join(
                        f"{s.blocks.start}-{s.blocks.stop - 1}: {len(s.plan.resident)} / {len(s.plan.streamed)}"
                        + (f" ({s.plan.streamed_bytes / 1e9:.1f} GB/step)" if s.plan.streamed else "")
                        for s in plan.stages
                    )
                    print(f"{row}{plan.step_s:>8.2f}  {where}")
    print("  In this time model every row's copies hide behind its compute (CFG at 1328^2 and up), so a second card")
    print("  gains nothing per step (its boundary copies add ~0.01 s); what it saves is the host side: the 20-30 GB of")
    print("  pinned host memory and the bus traffic of the streamed blocks (not costed here).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mfu", type=float, default=0.5)
    ap.add_argument("--reserve-gib", type=float, default=1.0)
    ap.add_argument("--text", type=int, default=256, help="text tokens")
    a = ap.parse_args()
    reserve = int(a.reserve_gib * P.GiB)
    models = {s: W.meta_model(s) for s in ("fp8", "bf16")}
    print(f"MFU {a.mfu:.0%}, reserve {a.reserve_gib:g} GiB, {a.text} text tokens, CFG batched (2 rows), bf16 compute")
    head = f"{'GPU':<16}{'link':<18}{'weights':<8}{'size':<6}{'GPUs':>4}{'compute':>9}{'a2a':>7}{'s/step':>8}"
    head += f"{'speedup':>9}"
    print(head + "  weights per GPU")
    print("-" * (len(head) + 30))
    for card, links, storages in SYSTEMS:
        card = replace(card, mfu=a.mfu)
        for link in links:
            for storage in storages:
                for px in (1024, 1328, 2048):
                    if px == 1024 and not card.name.startswith("H100"):
                        continue  # 1024^2: the published H100 comparison only
                    wl = P.DiTWorkload(px, px, cfg=True, text_tokens=a.text)
                    alone = None
                    for world in (1, 2, 4):
                        if world > link.max_gpus:
                            continue
                        try:
                            comp, a2a, total, plan = predict(card, link, models[storage], wl, world, reserve)
                        except P.PlanError:
                            print(f"{card.name:<16}{link.name:<18}{storage:<8}{px:<6}{world:>4}  does not fit")
                            continue
                        alone = alone or total
                        where = f"{len(plan.resident)}/60 resident"
                        if plan.streamed:
                            where += f", {len(plan.streamed)} streamed ({plan.streamed_bytes / 1e9:.1f} GB/step)"
                        print(
                            f"{card.name:<16}{link.name:<18}{storage:<8}{px:<6}{world:>4}{comp:>9.2f}{a2a:>7.2f}"
                            f"{total:>8.2f}{alone / total:>8.2f}x  {where}"
                        )
    placement_rows(a.mfu, reserve, models)
    wl = P.DiTWorkload(1024, 1024, cfg=True, text_tokens=a.text)
    h100 = replace(SYSTEMS[2][0], mfu=a.mfu)
    one, two = (predict(h100, NVSWITCH, models["bf16"], wl, w, reserve)[2] for w in (1, 2))
    print()
    print("Published, H100 bf16 1024^2 CFG, 50 steps (cache-dit, diffusers): 1 GPU 18.49 s, 2 GPUs Ulysses 12.81 s")
    print(f"  per step with everything: {18.49 / 50:.3f} s -> {12.81 / 50:.3f} s (1.44x)")
    rest = 18.49 / 50 - one  # what the published run spends per step besides the predicted DiT step
    print(f"  predicted DiT step here: {one:.3f} s -> {two:.3f} s ({one / two:.2f}x)")
    print(f"  the published run's remainder ({rest:.3f} s/step on 1 GPU if its DiT step is as predicted: text")
    print(f"  encoder, VAE, host work) is not split by Ulysses; with it: {18.49 / 50:.3f} -> {two + rest:.3f} s/step")
    print(f"  ({18.49 / 50 / (two + rest):.2f}x against the published 1.44x)")


if __name__ == "__main__":
    main()
