"""bench/gpu_check.py in its tiny mode (CPU): every phase runs without an error and every verdict passes, so the
one-command GPU check is ready for the next session that has a GPU (issue 13, 7)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_in_tiny_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    results = gpu_check.main(["--tiny", "--out", str(tmp_path), "--phases", "0,1,2,3,4,5,6,8,9,10,11,12"])
    phases = results["phases"]
    assert len(phases) == 12
    for name, entry in phases.items():
        assert "error" not in entry, (name, entry.get("traceback"))
        assert all(v["ok"] for v in entry.get("verdicts", {}).values()), (name, entry["verdicts"])
    assert phases["3_casts_and_syncs"]["host_syncs_per_forward"] == 0
    model = phases["12_step_model"]  # the step model's three rows, measured and modelled (verdicts on CUDA only)
    assert all(model[f"{r}_ms_{k}"] > 0 for r in ("default", "fp8", "fp8_compiled") for k in ("measured", "modelled"))
    assert json.loads((tmp_path / "gpu_check.json").read_text())["tiny"] is True
    assert (tmp_path / "gpu_check.txt").read_text().startswith("gpu_check on cpu")
