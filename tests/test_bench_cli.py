"""`python -m qwen_image_core bench` on CPU with synthetic tiny weights: the table and the line for an issue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_prints_the_table_and_the_issue_line():
    cmd = [sys.executable, "-m", "qwen_image_core", "bench", "--steps", "2", "--width", "128", "--height", "96"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("model ", "device ", "workload ", "s/step ", "peak VRAM ", "streamed/step ", "plan "):
        assert any(line.startswith(row) for line in out.splitlines()), (row, out)
    assert "synthetic tiny" in out and "128x96 CFG, 2 timed steps" in out
    assert "predicted" in out and "blocks resident" in out  # the planner's numbers beside the measured ones
    line = out.strip().splitlines()[-1]
    assert line.startswith("qwenpix bench | synthetic tiny | cpu float32 | 128x96 CFG | ") and " s/step (plan " in line
    measured = float(line.split(" | ")[4].split(" s/step")[0])
    assert measured > 0


def test_bench_refuses_sizes_the_model_cannot_take():
    cmd = [sys.executable, "-m", "qwen_image_core", "bench", "--steps", "1", "--width", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "multiples of 16" in proc.stderr


def test_the_main_job_bench_flag_runs_the_same_bench():
    cmd = ["bash", "tools/run.sh", "--bench", "--steps", "1", "--width", "64", "--height", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("qwenpix bench | synthetic tiny | cpu float32 | 64x64 CFG")
