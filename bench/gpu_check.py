"""One command that settles the open GPU questions of the CUDA path (issue 13, 7; plan: gpu_review.md §5).

    python bench/gpu_check.py [--out DIR] [--budget 540]     # on a CUDA GPU: real shapes, about 8 minutes
    python bench/gpu_check.py --tiny [--out DIR]             # anywhere: tiny shapes, seconds (the test suite runs it)

Phases (each skipped once the time budget is spent; every error is recorded, never fatal):
  0 environment        torch / CUDA / cuDNN, device properties, SDPA priority order
  1 attention          SDPA at the real joint shape: no mask, our old bool key mask, `attention.per_row`; kernels used
  2 one block          a full-width fp8 DoubleStreamBlock at 1328² CFG: ms, op categories, peak vs the estimate
  3 casts and syncs    fp8 / scaled-fp8 casts, LoRA beside the layer vs merged, host syncs of a forward
  4 executor stress    streamed = resident bit for bit with sleeps injected on both streams, a failing pass,
                       attach/detach cycles: device memory back to baseline
  5 overlap            the 60-block fp8 model (tiny: 6 blocks) streamed with several plans at 1328² CFG and 1024²
                       cfg 1: measured pass time vs `simulate()` fed the measured compute and bandwidth
  6 OOM and pins       out-of-memory re-plan, a failing attach rolled back, nested pinned copies over 4 workloads
  7 compile            one block under torch.compile (inductor)
  8 modulation         AdaLN modulation precomputed for 20 steps: equal forwards, bytes freed, precompute vs per step
  9 matmul             fp8 (_scaled_mm) and int8 (_int_mm) seams at the MLP shape: ms and error vs dequantised
 10 compile streamed   per-block compile (compiled.using) with 2 of 3 blocks streaming: equal, no recompiles
 11 norm and RoPE      QK-RMSNorm in bf16 (norms "compute") vs the float32 path, RoPE reading bf16: equal bits, ms
 12 step model         bench_step.py's per-component model with this device's measured rates vs the measured block:
                       default, fp8 matmul, fp8 matmul compiled (run third: it tests the 4090 prediction)
Writes gpu_check.json (every number and verdict) and gpu_check.txt (a summary) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check_common as common  # noqa: E402
import gpu_check_executor as executor  # noqa: E402
import gpu_check_kernels as kernels  # noqa: E402
import gpu_check_model as model  # noqa: E402
import gpu_check_seams as seams  # noqa: E402

Check = common.Check

PHASES = [  # (name, function, seconds needed on a GPU)
    ("0_environment", kernels.environment, 5),
    ("1_attention", kernels.attention_kernels, 30),
    ("2_one_block", kernels.one_block, 45),
    ("12_step_model", lambda c, e: model.step_model(c, e, common), 90),
    ("3_casts_and_syncs", kernels.casts_and_syncs, 40),
    ("4_executor_stress", executor.executor_stress, 90),
    ("5_overlap", executor.overlap, 180),
    ("6_oom_and_pins", executor.oom_and_pins, 40),
    ("7_compile", kernels.compiled, 60),
]
PHASES += [  # issue 13's seams (bench/gpu_check_seams.py; `common` gives them the random DiT, workload and plans)
    (name, lambda c, e, fn=fn: fn(c, e, common), need)
    for name, fn, need in (
        ("8_modulation", seams.modulation_phase, 30),
        ("9_matmul", seams.matmul_phase, 20),
        ("10_compile_streamed", seams.compile_streamed, 90),
        ("11_norm_rope", seams.norm_rope_phase, 15),
    )
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (any device; seconds)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all phases")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_check.json / .txt")
    ap.add_argument("--phases", default="", help="comma-separated phase numbers to run (default: all)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = Check(device, args.tiny or device.type != "cuda", args.budget)
    wanted = {p.strip() for p in args.phases.split(",") if p.strip()}
    for name, fn, need in PHASES:
        if not wanted or name.split("_")[0] in wanted:
            c.phase(name, lambda entry, fn=fn: fn(c, entry), 0 if c.tiny else need)
    c.results["seconds"] = round(time.monotonic() - c.start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(c.results, indent=1, default=str))
    lines = [f"gpu_check on {c.results['device']} (tiny={c.tiny}), {c.results['seconds']} s"]
    for name, entry in c.results["phases"].items():
        verdicts = entry.get("verdicts", {})
        status = "ERROR " + entry["error"] if "error" in entry else ("skipped" if "skipped" in entry else "ok")
        lines.append(f"{name}: {status}")
        lines += [f"  {'PASS' if v['ok'] else 'FAIL'} {k} {v.get('detail', '')}" for k, v in verdicts.items()]
        lines += [f"  {k} = {v}" for k, v in entry.items() if isinstance(v, (int, float)) and k != "seconds"]
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return c.results


if __name__ == "__main__":
    main()
