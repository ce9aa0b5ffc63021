"""bench/bench.py runs end to end and reports what the speed issue asks for (not a timing test)."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


def test_bench_reports_times_ratios_and_utilisation(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "U-DiT-S", "DiT-S/2", "--batch-size", "1", "--rounds", "1", "--warmup", "0",
                "--gemm-size", "256", "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results["models"]) == {"U-DiT-S", "DiT-S/2"} and results["gemm_ceiling_gflops"] > 0
    udit = results["models"]["U-DiT-S"]
    assert abs(udit["gmacs"] - 6.02) < 0.01 and udit["params"] == 58_896_568
    assert udit["train_step_s"] > 0 and udit["infer_s"] > 0 and 0 < udit["utilisation"]
    assert "vs DiT-S/2:" in capsys.readouterr().out
