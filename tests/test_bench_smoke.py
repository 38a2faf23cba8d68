"""The benchmarks run end to end at tiny sizes, so they cannot rot (no timing is asserted)."""

import json
import os
import subprocess
import sys

from multiprocess import REPO_ROOT


def test_cuda_pack_unpack_bench_runs_in_cpu_mode(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "bench/cuda_pack_unpack.py", "--device", "cpu", "--bucket-mb", "0.25", "--tensors", "20",
         "--shapes", "tiny", "--rounds", "1", "--calls-per-round", "1", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["tensors"] for row in report["bandwidth"]] == [20]
    assert set(report["syncs"][0]["methods"]) == {
        "localsgd_ext LocalSGD", "accelerate LocalSGD", "localsgd_ext (bare engine)", "flat all_reduce"}
    assert "Accelerate / ours" in result.stdout
