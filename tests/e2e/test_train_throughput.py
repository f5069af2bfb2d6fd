"""benchmarks/gpu/train_throughput.py runs on a CPU with a small config (CI checks that it works):
every candidate trains on the same batches from the same weights, and the ratios come last. The
compiled candidate is traced without inductor's code generation here (a minute of C++ builds on 2
cores); inductor's code is held to eager by tests/e2e/test_compile_cli.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_throughput_benchmark_runs_every_candidate_on_a_cpu():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/train_throughput.py"), "--device", "cpu",
                           "--model", "tiny", "--seq", "64", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
                           "--compile-backend", "aot_eager", "--json"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    runs = out["runs"]
    assert set(runs) == {"transformers", "eager", "compiled", "fp8"}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_vs_gemm"] and len(r["losses"]) == 3 for r in runs.values())
    # the same weights and tokens: the first losses agree (moetron's adds its small balance loss)
    assert runs["eager"]["losses"][0] == pytest.approx(runs["transformers"]["losses"][0], rel=2e-3)
    assert runs["compiled"]["losses"] == pytest.approx(runs["eager"]["losses"], rel=1e-5)
    assert set(out["ratios_vs_transformers"]) == {"eager", "compiled", "fp8"} and out["fp8_vs_eager"] > 0
