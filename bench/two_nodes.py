"""The main job on 2 "nodes" x 2 ranks, launched as a real multi-node job, against the same job on one node.

    sudo python bench/two_nodes.py [--rate 1gbit] [--epochs 2] [--hierarchy 2:2]

Each node is a network namespace (the two joined by a veth pair throttled with `tc tbf`, as in
bench/slow_link.py); in each, `torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` starts two
ranks, and the rendezvous runs over the veth. gloo is bound to the veth (GLOO_SOCKET_IFNAME), so ranks
of different nodes talk over the throttled link and ranks of one node inside their namespace. The job
is examples/train_digits.py with hierarchical averaging: each node's 2 ranks average every PERIOD steps,
the 4 every local_sgd_steps. Three runs:

  1. one node, 4 ranks (`torchrun --standalone`), with the hierarchy;
  2. two nodes, with the hierarchy;
  3. two nodes, without it (world averages only).

Checks that run 2 ends with parameters bit-identical to run 1's, and reports each run's time per
average per level (from the job's own lines) and the bytes on the inter-node link (the veth's kernel
counters): runs 2 and 3 should put the same bytes on it, since a node's averages stay inside it.
Needs root and iproute2; says what is missing otherwise. Writes JSON to --out.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slow_link  # noqa: E402  (the namespaces, the veth and its counters)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO_ROOT, "examples", "train_digits.py")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of the inter-node link, each direction")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--local-sgd-steps", type=int, default=8)
    parser.add_argument("--hierarchy", default="2:2", metavar="SIZE:PERIOD", help="the node level (SIZE must be 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    parser.add_argument("--out", default="bench/out")
    return parser.parse_args()


def job_arguments(args, save_path, hierarchy=True):
    extra = ["--hierarchy", args.hierarchy] if hierarchy else []
    return [
        JOB,
        "--epochs",
        str(args.epochs),
        "--hidden",
        str(args.hidden),
        "--local-sgd-steps",
        str(args.local_sgd_steps),
        "--save-params",
        save_path,
        *extra,
    ]


def report(output: str, seconds: float) -> dict:
    """The job's own lines: the world's median per average, and each level's."""
    world = re.search(r"per sync: median ([\d.]+) ms, min [\d.]+ ms, max [\d.]+ ms over (\d+) syncs", output)
    levels = re.findall(r"level of (\d+) ranks: median ([\d.]+) ms over (\d+) averages", output)
    accuracy = re.search(r"done: test accuracy ([\d.]+)%", output)
    if world is None or accuracy is None:
        raise SystemExit("the job printed no summary:\n" + output[-3000:])
    return {
        "wall_seconds": seconds,
        "test_accuracy": float(accuracy.group(1)),
        "world_ms": float(world.group(1)),
        "world_averages": int(world.group(2)),
        "levels": {size: {"ms": float(ms), "averages": int(n)} for size, ms, n in levels},
    }


def one_node(args, save_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        *job_arguments(args, save_path),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = "\n".join(slow_link.wait_all([process], args.timeout, "the one-node run"))
    return report(output, time.perf_counter() - start)


def two_nodes(args, save_path, port, hierarchy=True):
    bytes_before = slow_link.link_bytes()
    procs = []
    start = time.perf_counter()
    for node, (ns, interface, address) in enumerate(zip(slow_link.NAMESPACES, slow_link.INTERFACES, slow_link.ADDRESSES)):
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=interface)
        command = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "2",
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{slow_link.ADDRESSES[0]}:{port}",
            "--rdzv-id",
            f"localsgd-two-nodes-{port}",
            # Both namespaces share one hostname ("localhost"), so torchrun can neither tell which
            # hosts the store nor tell the workers where it is: say both.
            "--rdzv-conf",
            f"is_host={int(node == 0)}",
            "--local-addr",
            address,
            *job_arguments(args, save_path, hierarchy),
        ]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    output = "\n".join(slow_link.wait_all(procs, args.timeout, "the two-node run"))
    result = report(output, time.perf_counter() - start)
    result["link_bytes"] = slow_link.link_bytes() - bytes_before
    return result


def main():
    args = parse_args()
    if args.hierarchy.split(":")[0] != "2":
        raise SystemExit("--hierarchy: the node level has 2 ranks here (2 nodes x 2), e.g. 2:2")
    problems = slow_link.missing_requirements()
    if problems:
        raise SystemExit("bench/two_nodes.py cannot run here; it needs " + "; ".join(problems))
    with tempfile.TemporaryDirectory() as work:
        paths = [os.path.join(work, name) for name in ("one_node.pt", "two_nodes.pt", "two_nodes_flat.pt")]
        runs = {"one node, 4 ranks, hierarchy": one_node(args, paths[0])}
        try:
            slow_link.set_up_link(args.rate)
            runs["two nodes x 2 ranks, hierarchy"] = two_nodes(args, paths[1], port=29810)
            runs["two nodes x 2 ranks, world only"] = two_nodes(args, paths[2], port=29811, hierarchy=False)
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"setting up the link failed: {' '.join(error.cmd)}\n{error.stderr}")
        finally:
            slow_link.teardown()
        one, two = torch.load(paths[0]), torch.load(paths[1])
        identical = len(one) == len(two) and all(torch.equal(a, b) for a, b in zip(one, two))
    print(
        f"\nmain job, {args.epochs} epochs, local_sgd_steps={args.local_sgd_steps}, node level {args.hierarchy}, "
        f"inter-node link {args.rate} (tbf)"
    )
    print(f"{'run':<34}{'wall s':>8}{'accuracy':>10}{'world ms':>10}{'world n':>9}{'node ms':>9}{'node n':>8}{'link MB':>9}")
    for name, r in runs.items():
        level = r["levels"].get("2", {"ms": float("nan"), "averages": 0})
        link = f"{r['link_bytes'] / 1e6:.1f}" if "link_bytes" in r else "-"
        print(
            f"{name:<34}{r['wall_seconds']:>8.1f}{r['test_accuracy']:>9.1f}%{r['world_ms']:>10.2f}"
            f"{r['world_averages']:>9}{level['ms']:>9.2f}{level['averages']:>8}{link:>9}"
        )
    print(f"two-node parameters bit-identical to the one-node run's: {identical}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "two_nodes.json"), "w") as f:
        json.dump({"rate": args.rate, "hierarchy": args.hierarchy, "runs": runs, "identical": identical}, f, indent=1)
    if not identical:
        raise SystemExit("the two-node run ended with different parameters from the one-node run")


if __name__ == "__main__":
    main()
