"""Benchmark of the Qwen-Image-2.1 DiT on this CPU; prints two tables.

Ours vs diffusers' QwenImage21Transformer2DModel (its default SDPA processor), both float32 on one shared
in-memory random state dict (ComfyUI names for ours, the split SwiGLU for diffusers: views, not copies), at a
mid-size configuration: `--blocks` full-width blocks (4096 wide, 32 heads, SwiGLU 12288), a condition of
`--text` tokens with one reference of `--ref` x `--ref` latent tokens spliced in, a `--size` x `--size`
target latent (1024 tokens = a 512² image). Rows, each the median of `--repeats` interleaved runs, in process
CPU time (what a pass costs whatever else the machine runs; with 1 thread, its compute) and wall time:
* an uncached step (the whole sequence, block-causal), ours and diffusers';
* a cached step (the target's tokens only, prefix K/V from the cache), ours and diffusers';
* our prefill (computing the cache once) for scale.
The per-step saving of the cache is uncached / cached (CPU time).
A second table: the offload planner's predictions for the real 7B bf16 DiT on 8-24 GB cards at 1024² and
2048², text-to-image and with one reference of the target's size (prefix K/V cache included).

    .venv/bin/python bench/bench_dit21.py [--blocks 2] [--repeats 3] [--threads 2] [--size 32] [--ref 32]
                                          [--skip-forward]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_image_core.qwen21 import DiT21, DiT21Config  # noqa: E402
from tools.checkpoints import dit21 as W  # noqa: E402


def models(cfg: DiT21Config):
    from accelerate import init_empty_weights
    from diffusers import QwenImage21Transformer2DModel

    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) / (s[-1] ** 0.5 if len(s) == 2 else 10) for k, s in W.shapes(cfg).items()}
    with torch.device("meta"):
        ours = DiT21(cfg)
    ours.load_state_dict(sd, strict=True, assign=True)
    with init_empty_weights():
        ref = QwenImage21Transformer2DModel(num_layers=cfg.num_layers)
    ref.load_state_dict(W.diffusers_state_dict(sd), strict=True, assign=True)  # chunk(): views of `sd`
    return ours.requires_grad_(False).eval(), ref.requires_grad_(False).eval()


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call: CPU time is what the pass costs on a busy machine."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="target latent side (tokens)")
    ap.add_argument("--ref", type=int, default=32, help="reference latent side (tokens); 0: none")
    ap.add_argument("--text", type=int, default=128, help="text tokens of the condition")
    ap.add_argument("--skip-forward", action="store_true", help="only the offload predictions")
    args = ap.parse_args()
    if not args.skip_forward:
        forward_table(args)
    plan_table()


def plan_table():
    from qwen_image_core.costs import CARDS, GiB
    from qwen_image_core.offload_plan import PlanError
    from qwen_image_core.qwen21.plan import Workload21, plan_dit21, prefix_cache_bytes

    model = W.meta_model()
    print("\nOffload predictions, Qwen-Image-2.1 DiT 7B bf16 (13.9 GB of blocks), 512 text tokens, cfg 1:")
    print(f"{'card':16s} {'workload':41s} {'cache GB':>8s} {'resident':>8s} {'s/step':>7s} {'exposed':>7s}")
    for size in (1024, 2048):
        for refs, host in (((), False), (((size, size),), False), (((size, size),), True)):
            if host and size < 2048:
                continue
            wl = Workload21(width=size, height=size, references=refs, cache_on_host=host)
            for card in CARDS.values():
                cache = prefix_cache_bytes(model, wl) / 1e9
                try:
                    p = plan_dit21(model, card.vram - GiB, card, wl)
                    row = f"{len(p.resident):>5d}/32 {p.step_s:7.2f} {p.exposed_s:7.2f}"
                except PlanError:
                    row = f"{'does not fit':>24s}"
                print(f"{card.name:16s} {wl.describe():41s} {cache:8.2f} {row}")


def forward_table(args):
    torch.set_num_threads(args.threads)
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cfg = DiT21Config(num_layers=args.blocks)
    ours, ref = models(cfg)
    g = torch.Generator().manual_seed(1)
    n_slots = args.ref * args.ref // 4
    length = args.text + n_slots
    slots = torch.zeros(length, dtype=torch.bool)
    slots[args.text // 2 : args.text // 2 + n_slots] = True
    txt = torch.randn(1, length, cfg.text_dim, generator=g)
    refs = [torch.randn(1, 64, args.ref, args.ref, generator=g)] if args.ref else []
    img = torch.randn(1, 64, args.size, args.size, generator=g)
    sigma = torch.tensor([0.5])
    n = args.size * args.size
    tokens = torch.cat([*(r.flatten(2).transpose(1, 2) for r in refs), img.flatten(2).transpose(1, 2)], dim=1)
    shapes = [[*((1, args.ref, args.ref) for _ in refs), (1, args.size, args.size)]]
    img_mask = torch.cat([slots, torch.ones(n // 4, dtype=torch.bool)])[None]

    def theirs(kv=None, mode=None):
        return ref(tokens, txt, sigma, shapes, img_mask, kv_cache=kv, kv_cache_mode=mode, return_dict=False)[0]

    with torch.no_grad():
        cache = ours.prefill(txt, slots, refs)
        kv = QwenImage21KVCache(cfg.num_layers)
        theirs(kv, "extract")
        rows = {}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every row alike
            for name, fn in (
                ("uncached step: ours", lambda: ours(img, sigma, txt, slots, refs)),
                ("uncached step: diffusers", theirs),
                ("cached step: ours", lambda: ours(img, sigma, cache=cache)),
                ("cached step: diffusers", lambda: theirs(kv, "cached")),
                ("prefill (once per run): ours", lambda: ours.prefill(txt, slots, refs)),
            ):
                rows.setdefault(name, []).append(timed(fn))
        out_ours, out_ref = ours(img, sigma, cache=cache), theirs(kv, "cached")[:, -n:]
        err = (out_ours.flatten(2).transpose(1, 2) - out_ref).abs().max() / out_ref.abs().max()
    med = {k: statistics.median(c for c, _ in v) for k, v in rows.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in rows.items()}
    prefix = cache.prefix_len
    print(
        f"Qwen-Image-2.1 DiT, {cfg.num_layers} full-width blocks, float32, {args.threads} threads: prefix {prefix} "
        f"tokens ({args.text} text + {prefix - args.text} reference), target {n} tokens; median of {args.repeats}"
    )
    print(f"{'pass':34s} {'CPU s':>8s} {'wall s':>8s}")
    for k, v in med.items():
        print(f"{k:34s} {v:8.3f} {wall[k]:8.3f}")
    print("ratios of CPU time:")
    print(f"ours / diffusers, uncached: {med['uncached step: ours'] / med['uncached step: diffusers']:.2f}")
    print(f"ours / diffusers, cached:   {med['cached step: ours'] / med['cached step: diffusers']:.2f}")
    print(
        f"cache saving per step (uncached / cached, ours): {med['uncached step: ours'] / med['cached step: ours']:.2f}x"
    )
    print(f"cached step max |ours - diffusers| / max |diffusers|: {err:.2e}")
    print(f"prefix cache: {cache.nbytes / 2**20:.1f} MiB for {cfg.num_layers} blocks")


if __name__ == "__main__":
    main()
