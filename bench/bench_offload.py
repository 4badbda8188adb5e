"""Offloading simulation for 8/12/16/24 GB cards; prints the predicted seconds per DiT step.

For each card, weight storage (fp8 / bf16), resolution (1024^2, 1328^2) and guidance (cfg 1, CFG = cond
and uncond batched), three predictions from the same time model (`offload_plan.py`):
  all resident   compute only, where weights + activations + reserve fit in the free VRAM (else "-")
  our plan       the planner's resident/streamed split, copies replayed through the staging ring
  zero overlap   an offloader that keeps what fits and copies the rest without overlap, at the rate
                 DisTorch measured (+0.10 s per GB offloaded on PCIe 4.0 x16; scaled by 25 / link GB/s)
The real 20B DiT is built on the meta device (no memory), so the block bytes are the real ones.
Then a small CPU measurement: the executor's per-pass overhead on a tiny 6-block model.

    .venv/bin/python bench/bench_offload.py [--mfu 0.5] [--reserve-gib 1.0] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core import offload as O  # noqa: E402
from qwen_image_core import offload_plan as P  # noqa: E402
from qwen_image_core.mmdit import load_dit  # noqa: E402
from qwen_image_core.ops import Linear  # noqa: E402
from tools.checkpoints import dit as W  # noqa: E402

FREE_LOSS = 600 << 20  # CUDA context + desktop: free VRAM = total - 0.6 GiB


def simulation(mfu: float, reserve: int) -> None:
    print("Assumptions:")
    print(f"  free VRAM = card total - {FREE_LOSS / P.GiB:.1f} GiB; reserve {reserve / P.GiB:.1f} GiB; MFU {mfu:.0%}")
    print("  compute in bf16 (fp8 weights upcast per layer); FLOPs per block per step as anchors_performance §4.2")
    print("  (256 text tokens); copy time = block bytes / pinned H2D bandwidth; one pass per step (CFG batched)")
    print("  the planner's activation estimate (offload_plan.dit_activation_bytes) is in the free-memory budget")
    print("  zero-overlap offloader: +0.10 s per GB not resident at 25 GB/s links, scaled by 25 / link bandwidth")
    for c in P.CARDS.values():
        print(f"  {c.name}: {c.tflops} TFLOPS bf16 dense (SMs x clock x 512), {c.h2d_gbps} GB/s pinned H2D")
    print()
    head = f"{'card':<16}{'weights':<8}{'workload':<16}{'all resident':>13}{'our plan':>10}{'zero overlap':>14}"
    print(head + "  plan")
    print("-" * (len(head) + 60))
    models = {s: W.meta_model(s) for s in ("fp8", "bf16")}
    for card in P.CARDS.values():
        card = replace(card, mfu=mfu)
        free = card.vram - FREE_LOSS
        for storage, model in models.items():
            for px in (1024, 1328):
                for cfg in (False, True):
                    wl = P.DiTWorkload(px, px, cfg=cfg)
                    plan = P.plan_dit(model, free, card, wl, reserve=reserve)
                    fits = not plan.streamed
                    alone = f"{plan.compute_s:.2f}" if fits else "-"
                    zero = P.zero_overlap_step_s(plan, 0.10 * 25.0 / card.h2d_gbps)
                    line = f"{card.name:<16}{storage:<8}{wl.describe():<16}{alone:>13}{plan.step_s:>10.2f}{zero:>14.2f}"
                    what = f"{len(plan.resident)}/60 resident"
                    if plan.streamed:
                        gb = plan.streamed_bytes / 1e9
                        what += f", {len(plan.streamed)} streamed via {plan.buffers} ({gb:.1f} GB/step)"
                    print(f"{line}  {what}")
    print()


# Published ComfyUI figures per step (anchors_performance.md), keyed by (card, weights, px, cfg, lora)
COMFY = {
    ("24GB", "fp8", 1328, True, False): "3.2 (A1: 4090D 71 s / 20 steps warm, incl. TE+VAE; x114/128 SMs)",
    ("24GB", "fp8", 1328, False, True): "3.8 (A1: Lightning 8 steps 34 s warm, incl. TE+VAE; x114/128 SMs)",
}
LORA_RANK = 64  # a Lightning-size LoRA on every block linear (modulation included)


def lora_cost(model, wl: P.DiTWorkload, rank: int) -> tuple[float, int, float]:
    """(FLOPs per block per step beside the layers, factor bytes of the whole model in bf16, the share of those FLOPs
    that the modulation layers take: gone once the modulation is precomputed). Each Linear of a block adds
    2 rank (in + out) FLOPs per token (its stream's tokens; one row for the modulation)."""
    flops = mod = 0.0
    for name, m in model.transformer_blocks[0].named_modules():
        if isinstance(m, Linear):
            tokens = (
                1 if "_mod" in name else wl.image_tokens if name.startswith(("img", "attn.to_")) else wl.text_tokens
            )
            f = 2 * rank * (m.in_features + m.out_features) * tokens * wl.rows
            flops, mod = flops + f, mod + (f if "_mod" in name else 0)
    params = sum(
        rank * (m.in_features + m.out_features) for m in model.transformer_blocks.modules() if isinstance(m, Linear)
    )
    return flops, 2 * params, mod


def plan_with(model, card: P.Card, wl: P.DiTWorkload, reserve: int, modulation: bool = False, rank: int = 0,
              fp8_matmul: bool = False, steps: int = 20) -> P.Plan:  # fmt: skip
    """plan_dit with the extras of the issue's columns: precomputed modulation, a rank-`rank` LoRA (its FLOPs beside
    each layer, its factors resident on the device), fp8 GEMMs (the linear FLOPs at twice the bf16 rate)."""
    base = P.plan_dit(model, card.vram - FREE_LOSS, card, wl, reserve=reserve, modulation=modulation, steps=steps)
    if not rank and not fp8_matmul:
        return base
    cfg = model.config
    n, d, f = wl.tokens, cfg.hidden, cfg.mlp_dim
    linear, attention = wl.rows * 2 * (4 * d * d + 2 * d * f) * n, wl.rows * 4 * n * n * d
    mod = 0.0 if modulation else wl.rows * 2 * 2 * 6 * d * d
    extra, lora_bytes, lora_mod = lora_cost(model, wl, rank) if rank else (0.0, 0, 0.0)
    extra -= lora_mod if modulation else 0.0
    rate = card.tflops * 1e12 * card.mfu
    block_s = (linear / (2 if fp8_matmul else 1) + attention + mod + extra) / rate
    return P.plan_blocks(base.block_bytes, base.fixed_bytes + lora_bytes, base.free, reserve, base.activation_bytes,
                         block_s, card.h2d_gbps * P.GB, base.name, base.storage)  # fmt: skip


def issue_table(mfu: float, reserve: int) -> None:
    """The issue's Numbers: s/step with the modulation precomputed, with a LoRA, with fp8 GEMMs, ComfyUI's figures."""
    print(f"Issue 13 columns (s/step; LoRA = rank {LORA_RANK} on every block linear, factors resident in bf16):")
    head = (f"{'card':<16}{'weights':<8}{'workload':<16}{'all res':>8}{'ours':>7}{'+mod':>7}{'+LoRA':>7}{'LoRA %':>7}"
            f"{'fp8 mm':>7}{'vs all':>7}{'GB/step ours>+mod>+LoRA':>25}  ComfyUI published")  # fmt: skip
    print(head)
    print("-" * (len(head) + 30))
    models = {s: W.meta_model(s) for s in ("fp8", "bf16")}
    goals, moved = [], []

    def gb(plan):
        return plan.streamed_bytes / 1e9

    for key, card in P.CARDS.items():
        card = replace(card, mfu=mfu)
        for storage, model in models.items():
            for px in (1024, 1328):
                for cfg in (False, True):
                    wl = P.DiTWorkload(px, px, cfg=cfg)
                    ours = plan_with(model, card, wl, reserve)
                    pre = plan_with(model, card, wl, reserve, modulation=True)
                    lora = plan_with(model, card, wl, reserve, modulation=True, rank=LORA_RANK)
                    fp8 = (
                        plan_with(model, card, wl, reserve, modulation=True, fp8_matmul=True)
                        if storage == "fp8"
                        else None
                    )
                    lora_pct = 100 * (lora.step_s / pre.step_s - 1)
                    vs_all = pre.step_s / pre.compute_s
                    comfy = COMFY.get((key, storage, px, cfg, False), "-")
                    print(f"{card.name:<16}{storage:<8}{wl.describe():<16}{ours.compute_s:>8.2f}{ours.step_s:>7.2f}"
                          f"{pre.step_s:>7.2f}{lora.step_s:>7.2f}{lora_pct:>6.1f}%"
                          f"{(f'{fp8.step_s:.2f}' if fp8 else '-'):>7}{vs_all:>6.2f}x"
                          f"{f'{gb(ours):.1f} > {gb(pre):.1f} > {gb(lora):.1f}':>25}  {comfy}")  # fmt: skip
                    if pre.streamed_bytes:
                        moved.append(
                            (lora.streamed_bytes / pre.streamed_bytes, f"{card.name} {storage} {wl.describe()}")
                        )
                    lora_comfy = COMFY.get((key, storage, px, cfg, True))
                    if lora_comfy:
                        print(f"{'':<40}{'with the LoRA, ComfyUI published:':>45}  {lora_comfy}")
                    if key == "24GB" and storage == "fp8" and px == 1328 and cfg:
                        uniform = "4090 fp8 1328 CFG, 20 steps, fp8 GEMMs at a uniform 50 % MFU (goal: bench_step.py)"
                        goals.append((uniform, 20 * fp8.step_s, None))
                        goals.append(("4090 fp8 1328 CFG, 20 steps, bf16 GEMMs (for reference)", 20 * pre.step_s, None))
                    if key == "12GB":
                        goals.append((f"12 GB {storage} {wl.describe()}: ours / all-resident <= 1.15", vs_all, 1.15))
                    goals.append((f"{card.name} {storage} {wl.describe()}: LoRA adds <= 3 %", lora_pct, 3.0))
    print("(all res: compute only, as if every weight fitted; ours: today's plan; +mod: modulation precomputed, its")
    print(" weights off the device and out of the stream; +LoRA: with the LoRA on top; fp8 mm: +mod with fp8 GEMMs;")
    print(" vs all: +mod / all res; GB/step: bytes streamed per step by each plan)")
    print()
    print("Goals (issue 13, Numbers), predicted:")
    failed = [g for g in goals if g[2] is not None and g[1] > g[2]]
    for name, value, limit in goals:
        if "LoRA" in name and value <= 3.0:
            continue  # the passing LoRA rows are in the table; failures are listed
        verdict = "" if limit is None else ("PASS" if value <= limit else "FAIL")
        print(f"  {name}: {value:.2f} {verdict}")
    n_lora = sum("LoRA" in g[0] for g in goals)
    print(f"  LoRA <= 3 %: {n_lora - sum('LoRA' in g[0] for g in failed)} of {n_lora} rows pass")
    worst = max(moved)
    print(
        "  bytes moved per step with the LoRA / without, same plan: 1.00x PASS (<= 1.02x; the executor streams no LoRA"
        " byte: asserted in tests/test_lora_beside.py)"
    )
    print(
        f"  bytes streamed per step with the LoRA / without, each planned for its own room: worst {worst[0]:.2f}x "
        f"({worst[1]}): the factors' own device bytes displace blocks, hidden behind compute (LoRA time above)"
    )
    print()


def text_encoder_table(mfu: float, reserve: int) -> None:
    """Qwen2.5-VL-7B (28 layers + vision tower kept resident while it runs), one 512-token prompt."""
    from qwen_image_core.qwen_vl import QwenVL, QwenVLConfig  # noqa: PLC0415

    print("Text encoder, 512 tokens, alone on the card (TE -> DiT -> VAE placement): s per encode")
    print(f"{'card':<16}{'weights':<8}{'compute':>9}{'our plan':>10}  plan")
    for storage in ("fp8", "bf16"):
        with torch.device("meta"):
            te = QwenVL(QwenVLConfig()).to(torch.bfloat16)
        if storage == "fp8":
            for mod in te.model.layers.modules():
                if isinstance(mod, Linear):
                    mod.weight.data = mod.weight.data.to(torch.float8_e4m3fn)
        for card in P.CARDS.values():
            card = replace(card, mfu=mfu)
            plan = P.plan_text_encoder(te, card.vram - FREE_LOSS, card, tokens=512, reserve=reserve)
            print(f"{card.name:<16}{storage:<8}{plan.compute_s:>9.3f}{plan.step_s:>10.3f}  {plan.explain()}")
    print("(a 512-token prompt is 0.24 TFLOP per layer: on slow cards that hides the copies of fp8 layers;")
    print(" short prompts on fast cards are copy-bound, so the planner keeps every layer that fits resident)")
    print()


def cpu_overhead(repeats: int = 5) -> None:
    """Tiny model on CPU: forward time all resident vs streaming all 6 blocks (hooks + copies)."""

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = W.tiny_config(num_layers=6, num_heads=6, head_dim=64, mlp_dim=1536, rope_axes=(8, 28, 28))
        model = load_dit(W.write_comfy(Path(tmp) / "t.safetensors", cfg, dtype=torch.float32))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 32, 32, generator=g), torch.rand(2, generator=g), torch.randn(2, 32, 40, generator=g)
        sizes, fixed = P.split_blocks(model, model.transformer_blocks)

        def timed():
            model(*x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(*x)
                times.append(time.perf_counter() - t)
            return statistics.median(times)

        base = timed()
        print(f"CPU executor overhead (tiny DiT: 6 blocks of {sizes[0] / 1e6:.1f} MB, 512 image tokens, 1 thread)")
        print(f"{'resident':>9}{'streamed':>9}{'s/pass':>9}{'vs resident':>12}{'MB moved/pass':>15}")
        print(f"{6:>9}{0:>9}{base:>9.3f}{1.0:>12.2f}{0:>15.1f}")
        for resident in (3, 0):
            plan = P.plan_blocks(sizes, fixed, fixed + (resident + 2) * max(sizes), 0, 0, 1.0, 1e9)
            with O.BlockStreamer(model, model.transformer_blocks, plan, O.Transfer()) as s:
                t = timed()
            moved = s.stats.bytes_moved / s.stats.passes / 1e6
            print(f"{len(plan.resident):>9}{len(plan.streamed):>9}{t:>9.3f}{t / base:>12.2f}{moved:>15.1f}")
        print("(on CPU a 'copy' is a memcpy on the compute thread, so nothing overlaps here; this measures the")
        print(" executor's bookkeeping + memcpy cost, not the CUDA overlap, which cannot run on this machine)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfu", type=float, default=0.5)
    ap.add_argument("--reserve-gib", type=float, default=1.0)
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    simulation(args.mfu, int(args.reserve_gib * P.GiB))
    issue_table(args.mfu, int(args.reserve_gib * P.GiB))
    text_encoder_table(args.mfu, int(args.reserve_gib * P.GiB))
    if not args.skip_cpu:
        cpu_overhead()


if __name__ == "__main__":
    main()
