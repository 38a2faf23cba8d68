"""The benchmarks run end to end at tiny sizes, so they cannot rot (no timing is asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from multiprocess import REPO_ROOT

REPO_ROOT_PATH = pathlib.Path(REPO_ROOT)


def run_on_two_ranks(script, *args, timeout=240):
    """`script` under torchrun with two ranks on this machine, one thread each; fails with its output unless
    it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_cuda_pack_unpack_bench_runs_in_cpu_mode(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [
            sys.executable,
            "bench/cuda_pack_unpack.py",
            "--device",
            "cpu",
            "--bucket-mb",
            "0.25",
            "--tensors",
            "20",
            "--shapes",
            "tiny",
            "--rounds",
            "1",
            "--calls-per-round",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["tensors"] for row in report["bandwidth"]] == [20]
    assert set(report["syncs"][0]["methods"]) == {
        "localsgd_ext LocalSGD",
        "accelerate LocalSGD",
        "localsgd_ext (bare engine)",
        "flat all_reduce",
    }
    assert "Accelerate / ours" in result.stdout


def test_averaging_latency_bench_runs_at_tiny_sizes(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "bench/averaging_latency.py",
            "--smoke",
            "--ranks",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "averaging_latency.json").read_text())
    (per_world_size,) = report["reports"]
    assert per_world_size["world_size"] == 2
    assert [r["shape"] for r in per_world_size["results"]] == ["wide", "tiny", "transformer", "mixed"]
    methods = per_world_size["results"][0]["methods"]
    for method in (
        "localsgd_ext",
        "localsgd_ext LocalSGD",
        "localsgd_ext zero-copy",
        "localsgd_ext LocalSGD zero-copy",
        "accelerate LocalSGD",
        "torch average_parameters",
        "python cat buckets",
        "flat all_reduce (floor)",
        "localsgd_ext cap=1",
        "localsgd_ext cap=100",
    ):
        assert methods[method]["median_ms"] > 0, method
    assert (tmp_path / "averaging_latency.png").stat().st_size > 0


def test_agreement_check_bench_runs_at_tiny_sizes(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/agreement_check.py", "--smoke", "--rounds", "2", "--big-rounds", "1", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "agreement_check_2ranks.json").read_text())
    assert set(report["median_ms"]) == {
        "small all_reduce (floor)",
        "check: 2000 tensors",
        "check: + 2000 named buffers",
        "sync: tiny",
        "sync: wide bf16 wire",
        "sync: wide fp16 wire",
        "DiLoCo enter digest (wide)",
    }


def test_pipeline_depth_bench_runs_at_tiny_sizes():
    result = run_on_two_ranks("bench/pipeline_depth.py", "--smoke", "--rounds", "1", "--bucket-cap-mb", "0.001", timeout=180)
    for variant in ("copy, 1 in flight", "copy, 3 in flight", "zero-copy", "flat all_reduce AVG (floor)"):
        assert variant in result.stdout, variant


def test_zero_copy_memory_bench_runs_at_tiny_sizes():
    result = subprocess.run(
        [sys.executable, "bench/zero_copy_memory.py", "--smoke", "--shape", "wide"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "flattening: peak +" in result.stdout


@pytest.fixture(scope="module")
def slow_link():
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    import slow_link

    return slow_link


def test_slow_link_bench_names_what_it_lacks(monkeypatch, slow_link):
    """Without root or iproute2 the slow-link benchmark refuses to start and says why."""
    monkeypatch.setattr(slow_link.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(slow_link.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/" + tool)
    problems = slow_link.missing_requirements()
    assert any("root" in p for p in problems)
    assert any("`tc` from iproute2" in p for p in problems)
    assert not any("`ip`" in p for p in problems)


def test_slow_link_bench_runs_briefly_where_it_can(tmp_path, slow_link):
    missing = slow_link.missing_requirements()
    if missing:
        pytest.skip("needs " + "; ".join(missing))
    result = subprocess.run(
        [
            sys.executable,
            "bench/slow_link.py",
            "--modes",
            "ddp",
            "4",
            "4d2",
            "4d1f2qe",
            "none",
            "--max-steps",
            "32",
            "--hidden",
            "64",
            "--target-loss",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "slow_link.json").read_text())
    assert [(r["mode"], r["steps"], r["reached"]) for r in report["results"]] == [
        ("ddp", 32, False),
        ("4", 32, False),
        ("4d2", 32, False),
        ("4d1f2qe", 32, False),
        ("none", 32, False),
    ]
    assert report["results"][1]["syncs"] == 9  # 32 / 4, plus the one at exit
    assert report["results"][2]["syncs"] == 9  # 8 merged (the last at exit), plus the exit sync
    assert report["results"][3]["syncs"] == 16 + 2  # a fragment every 2 steps, then both at exit
    assert report["results"][4]["syncs"] == 0
    assert "LocalSGD K=4, delay 2" in result.stdout and "no communication" in result.stdout
    assert "LocalSGD K=4, delay 1, 2 fragments, int8 + EF" in result.stdout
    # Counted on the link: DDP sends a gradient every step, LocalSGD a model every 4, the int8 wire less,
    # `none` almost nothing.
    link = [r["link_bytes"] for r in report["results"]]
    assert link[0] > 2 * link[1] > 0 and link[4] < link[1] / 4 and link[3] < link[1]
    assert (tmp_path / "slow_link.png").stat().st_size > 0


def test_two_nodes_launched_with_torchrun_end_identical_to_one_node(tmp_path, slow_link):
    """2 "nodes" (network namespaces) x 2 ranks, `torchrun --nnodes 2 --rdzv-backend c10d`, the main job
    with hierarchical averaging: the same parameters, bit for bit, as 4 ranks on one node; a node's
    averages never cross the inter-node link."""
    missing = slow_link.missing_requirements()
    if missing:
        pytest.skip("needs " + "; ".join(missing))
    result = subprocess.run(
        [sys.executable, "bench/two_nodes.py", "--epochs", "1", "--hidden", "64", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "two_nodes.json").read_text())
    assert report["identical"]
    runs = report["runs"]
    hierarchical, flat = runs["two nodes x 2 ranks, hierarchy"], runs["two nodes x 2 ranks, world only"]
    assert hierarchical["levels"]["2"]["averages"] > 0 and "2" not in flat["levels"]
    # The same world averages cross the link either way; the rendezvous' keep-alives vary by a few KB.
    assert abs(hierarchical["link_bytes"] - flat["link_bytes"]) < 0.05 * flat["link_bytes"]


def test_wires_public_api_bench_runs(tmp_path):
    out = tmp_path / "wires.json"
    configs = ["--configs", "fp32", "int8 zero-copy"]
    run_on_two_ranks(
        "bench/wires_public_api.py", "--shapes", "tiny", "--rounds", "1", "--warmup", "0", *configs, "--out", str(out)
    )
    (shape,) = json.loads(out.read_text())["results"]
    assert set(shape["methods"]) == {"fp32", "int8 zero-copy", "flat all_reduce (floor)"} and not shape["refused"]


def test_sync_bounds_bench_runs():
    result = run_on_two_ranks("bench/sync_bounds.py", "--shape", "tiny", "--smoke", "--rounds", "1")
    for method in ("flat all_reduce (floor)", "int8: exchange alone", "int8: passes alone", "int8: sync"):
        assert method in result.stdout
    assert "int8 with one core per rank: exchange CPU + two streamed copies" in result.stdout


@pytest.mark.parametrize(
    "script, recorded",
    [("bench/averaging_latency.py", "averaging_latency.json"), ("bench/slow_link.py", "fragments_int8_slow_link.json")],
)
def test_the_recorded_results_replot(tmp_path, script, recorded):
    # The figures in bench/results are drawn from the JSON beside them, with no rerun.
    copy = tmp_path / recorded
    copy.write_text((REPO_ROOT_PATH / "bench" / "results" / recorded).read_text())
    result = subprocess.run(
        [sys.executable, script, "--replot", str(copy)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert copy.with_suffix(".png").stat().st_size > 10_000
