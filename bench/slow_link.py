"""Local SGD over a slow link, end to end: wall-clock time to a target loss with every-step gradient sync
(plain DDP) against our LocalSGD with K = 4, 8 and 16.

    sudo python bench/slow_link.py [--rate 1gbit] [--modes ddp 4 8 16] [--target-loss 0.02]
    sudo python bench/slow_link.py --modes none ddp 8 8d2 8d4      # the floor, and overlapped syncs
    sudo python bench/slow_link.py --modes 8f2 8q 8qe 8fp8 8d4q 8d1f2qe  # fragments, int8/fp8 wires, combinations

Modes: `ddp` (gradient all-reduce every step), `K` (LocalSGD, local_sgd_steps=K), `none` (no
communication at all: each rank trains alone; the compute-only floor). A LocalSGD mode `K` may carry,
in this order: `dT` (sync_delay=T: each sync overlapped with the next T steps), `fP`
(num_fragments=P), `q` (wire="int8"), `fp8` (wire="fp8"), `i4` (wire="int4"), `bf16` or `fp16` (those wires),
then `e` (error_feedback, with the quantized wires), `o`
(outer_optimizer="diloco"), `s` (merge="streaming": Streaming DiLoCo's timing and merge, alpha 0). With
sync_delay or fragments the loss is measured on rank 0's parameters, which then include some local steps of
its own.

Two ranks, each in its own network namespace, joined by a veth pair throttled with `tc tbf` on both ends
(`netem` does not work on every kernel; `tbf` does). gloo is bound to the veth (GLOO_SOCKET_IFNAME), so
every byte between the ranks crosses the throttled link; traffic never leaves the two namespaces.
Needs root and iproute2 (`ip`, `tc`; Debian package iproute2): the script checks and says what is
missing. Every run is bounded (--max-seconds of training, plus a hard deadline per run), and the
namespaces are removed at the end whatever happens.

The job: an MLP (64 -> 1536 -> 1536 -> 10, 2.5M fp32 parameters) on scikit-learn's bundled digits, the
same seeds and data order in every mode, through Accelerate. Every 16 steps (a sync point for every K),
rank 0 measures the cross-entropy on the full training set; the clock stops while it does. A mode
reaches the target when that loss is <= --target-loss. The veth's byte counters give the bytes each
mode put on the link. Output: a table, JSON, and a PNG of loss against wall-clock time (--out).
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

NAMESPACES = ("lsgd_rank0", "lsgd_rank1")
INTERFACES = ("lsgd_veth0", "lsgd_veth1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
EVAL_EVERY = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of the link, each direction")
    parser.add_argument("--modes", nargs="+", default=["ddp", "4", "8", "16"], help="'ddp' or a local_sgd_steps K")
    parser.add_argument("--target-loss", type=float, default=0.02)
    parser.add_argument("--max-seconds", type=float, default=300, help="training-clock bound per mode")
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--replot", metavar="JSON", help="only draw the PNG (next to it) from a JSON written earlier")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------
# Rank side


def train(args):
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from localsgd_ext import LocalSGD

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    digits = load_digits()
    features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(
        TensorDataset(features, labels), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    mode = parse_mode(args.mode)
    ddp = mode["kind"] == "ddp"
    communicating = mode["kind"] != "none"

    def full_loss():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(accelerator.unwrap_model(model)(features), labels).item()

    trace = [(0, 0.0, full_loss())]
    clock, step, reached = 0.0, 0, False
    no_communication = model.no_sync() if not communicating else contextlib.nullcontext()
    local_sgd = LocalSGD(
        accelerator=accelerator,
        model=model,
        local_sgd_steps=mode["steps"],
        enabled=mode["kind"] == "local_sgd",
        sync_delay=mode["delay"],
        num_fragments=mode["fragments"],
        wire=mode["wire"],
        error_feedback=mode["error_feedback"],
        outer_optimizer="diloco" if mode["outer"] else None,
        merge="streaming" if mode["streaming"] else "eager",
    )
    with no_communication, local_sgd:
        while not reached and step < args.max_steps and clock < args.max_seconds:
            for x, y in loader:
                start = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                local_sgd.step()
                clock += time.perf_counter() - start
                step += 1
                if step % EVAL_EVERY == 0:
                    # Every mode's parameters agree here (DDP always; LocalSGD just synced, but with
                    # sync_delay the last T steps are rank 0's own): rank 0's loss is the model's. The
                    # decision to stop goes to both ranks off the clock.
                    value = full_loss() if accelerator.is_main_process else 0.0
                    trace.append((step, clock, value))
                    flag = torch.tensor([1.0 if value and value <= args.target_loss else 0.0])
                    dist.broadcast(flag, src=0)
                    reached = bool(flag.item())
                if reached or step >= args.max_steps or clock >= args.max_seconds:
                    break
    if accelerator.is_main_process:
        result = {
            "mode": args.mode,
            "steps": step,
            "seconds": clock,
            "reached": reached,
            "final_loss": trace[-1][2],
            "trace": trace,
            "syncs": step if ddp else local_sgd.sync_count,
        }
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.free_memory(model, optimizer, loader)
    accelerator.end_training()


MODE_PATTERN = re.compile(
    r"^(?P<steps>\d+)(?:d(?P<delay>\d+))?(?:f(?P<fragments>\d+))?(?:(?P<wire>q|fp8|i4|bf16|fp16)(?P<ef>e)?)?(?P<outer>o)?(?P<streaming>s)?$"
)


def parse_mode(mode: str) -> dict:
    """'ddp', 'none', or 'K[dT][fP][q|fp8|i4|bf16|fp16][e][o][s]' (see the module docstring)."""
    plain = {"delay": 0, "fragments": 1, "wire": None, "error_feedback": False, "outer": False, "streaming": False}
    if mode in ("ddp", "none"):
        return {"kind": mode, "steps": 1, **plain}
    match = MODE_PATTERN.match(mode)
    if match is None:
        raise SystemExit(
            f"--modes: each mode is 'ddp', 'none' or 'K[dT][fP][q|fp8|i4|bf16|fp16][e][o][s]' (e.g. 8d2f2qe), got {mode!r}"
        )
    return {
        "kind": "local_sgd",
        "steps": int(match["steps"]),
        "delay": int(match["delay"] or 0),
        "fragments": int(match["fragments"] or 1),
        "wire": {"q": "int8", "fp8": "fp8", "i4": "int4", "bf16": "bf16", "fp16": "fp16", None: None}[match["wire"]],
        "error_feedback": match["ef"] is not None,
        "outer": match["outer"] is not None,
        "streaming": match["streaming"] is not None,
    }


def describe_mode(mode: str) -> str:
    parsed = parse_mode(mode)
    if parsed["kind"] == "ddp":
        return "DDP (every step)"
    if parsed["kind"] == "none":
        return "no communication"
    parts = [f"K={parsed['steps']}"]
    if parsed["delay"]:
        parts.append(f"delay {parsed['delay']}")
    if parsed["fragments"] > 1:
        parts.append(f"{parsed['fragments']} fragments")
    if parsed["wire"]:
        parts.append(parsed["wire"] + (" + EF" if parsed["error_feedback"] else ""))
    if parsed["outer"]:
        parts.append("DiLoCo outer step")
    if parsed["streaming"]:
        parts.append("streaming merge")
    return "LocalSGD " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Launcher side


def run(command, check=True):
    return subprocess.run(command, check=check, capture_output=True, text=True)


def missing_requirements():
    problems = []
    if os.geteuid() != 0:
        problems.append("root (network namespaces and tc need it; run with sudo)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` from iproute2 (apt-get install iproute2)")
    return problems


def teardown():
    for ns in NAMESPACES:
        run(["ip", "netns", "del", ns], check=False)


def set_up_link(rate):
    teardown()
    for ns in NAMESPACES:
        run(["ip", "netns", "add", ns])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
    run(
        [
            "ip",
            "link",
            "add",
            INTERFACES[0],
            "netns",
            NAMESPACES[0],
            "type",
            "veth",
            "peer",
            "name",
            INTERFACES[1],
            "netns",
            NAMESPACES[1],
        ]
    )
    for ns, interface, address in zip(NAMESPACES, INTERFACES, ADDRESSES):
        run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/30", "dev", interface])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", interface, "up"])
        run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                interface,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            ]
        )


def link_bytes() -> int:
    """Bytes the veth has carried so far, both directions: the kernel's own counters, read in rank 0's
    namespace (counted, not estimated; the process group's set-up and the stop flags are in them too)."""
    total = 0
    for counter in ("rx_bytes", "tx_bytes"):
        path = f"/sys/class/net/{INTERFACES[0]}/statistics/{counter}"
        total += int(run(["ip", "netns", "exec", NAMESPACES[0], "cat", path]).stdout)
    return total


def wait_all(procs, timeout, what):
    """Each process's output, once all have exited 0; all are killed if one outlives `timeout`."""
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise SystemExit(f"{what}: no result within {timeout:.0f} s; killed")
        outputs.append(out)
    if any(p.returncode != 0 for p in procs):
        raise SystemExit(f"{what} failed:\n" + "\n".join(o[-3000:] for o in outputs))
    return outputs


def run_mode(args, mode, port):
    script = os.path.abspath(__file__)
    bytes_before = link_bytes()
    procs = []
    for rank, (ns, interface) in enumerate(zip(NAMESPACES, INTERFACES)):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=ADDRESSES[0],
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME=interface,
            OMP_NUM_THREADS="1",
        )
        command = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            script,
            "--worker",
            "--mode",
            mode,
            "--target-loss",
            str(args.target_loss),
            "--max-seconds",
            str(args.max_seconds),
            "--max-steps",
            str(args.max_steps),
            "--hidden",
            str(args.hidden),
        ]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = args.max_seconds * 3 + 120  # training clock + evaluation + start-up
    outputs = wait_all(procs, deadline, f"mode {mode}")
    (line,) = [output for output in outputs[0].splitlines() if output.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    result["link_bytes"] = link_bytes() - bytes_before
    return result


# One colour per mode, the same in every figure (modes not listed take the next free colours).
MODE_ORDER = (
    "none",
    "ddp",
    "4",
    "8",
    "16",
    "8d1",
    "8d2",
    "8d4",
    "8f2",
    "8d1f2",
    "8q",
    "8qe",
    "8fp8",
    "8d4q",
    "8d4qe",
    "8d4fp8",
    "8d1f2q",
    "8d1f2qe",
)
REFERENCE_MODES = ("none", "ddp")  # drawn in every panel, for scale
CURVES_PER_PANEL = 6


def mode_colours(modes) -> dict:
    """One colour per mode: the listed modes (MODE_ORDER) always the same, the others the palette's next
    colours that no mode of this figure holds."""
    import matplotlib.pyplot as plt

    # Two qualitative palettes, gray left out (DDP's): 17 colours that stay apart.
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + list(plt.get_cmap("Dark2").colors)
    colours = {"none": "black", "ddp": "tab:gray"}
    listed = [m for m in modes if m in MODE_ORDER and m not in colours]
    for mode in listed:
        colours[mode] = palette[(MODE_ORDER.index(mode) - 2) % len(palette)]
    free = [c for c in palette if c not in colours.values()]
    for mode in modes:
        if mode not in colours:
            colours[mode] = free.pop(0) if free else palette[len(colours) % len(palette)]
    return colours


def parameter_count(hidden: int) -> int:
    return (64 * hidden + hidden) + (hidden * hidden + hidden) + (hidden * 10 + 10)


def plot(results, path, rate: str, target_loss: float, hidden: int):
    """Loss against wall-clock time, at most CURVES_PER_PANEL curves a panel (the references in each),
    one colour per mode, the legend beside the curves, the target loss and the model size stated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = mode_colours([r["mode"] for r in results])
    references = [r for r in results if r["mode"] in REFERENCE_MODES]
    others = [r for r in results if r["mode"] not in REFERENCE_MODES]
    per_panel = max(1, CURVES_PER_PANEL - len(references))
    panels = [others[i : i + per_panel] for i in range(0, len(others), per_panel)] or [[]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.5, 3.6 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for r in references + panel:
            steps, seconds, losses = zip(*r["trace"])
            reference = r["mode"] in REFERENCE_MODES
            ax.plot(
                seconds,
                losses,
                marker="" if reference else ".",
                linewidth=1.0 if reference else 1.6,
                linestyle=":" if reference else "-",
                color=colours[r["mode"]],
                label=describe_mode(r["mode"]),
            )
        ax.axhline(target_loss, color="black", linewidth=0.8, linestyle="--", label=f"target loss {target_loss}")
        ax.set_yscale("log")
        ax.set_ylabel("cross-entropy, training set")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("training wall-clock time (s)")
    axes[0, 0].set_title(
        f"2 ranks over a {rate}/s link (veth + tc tbf), gloo\nMLP 64-{hidden}-{hidden}-10 "
        f"({parameter_count(hidden) / 1e6:.1f}M fp32 parameters), target loss {target_loss}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = parse_args()
    if args.replot:
        with open(args.replot) as f:
            recorded = json.load(f)
        hidden = recorded.get("hidden", args.hidden)
        plot(recorded["results"], os.path.splitext(args.replot)[0] + ".png", recorded["rate"], recorded["target_loss"], hidden)
        return
    if args.worker:
        train(args)
        return
    for mode in args.modes:
        parse_mode(mode)
    problems = missing_requirements()
    if problems:
        raise SystemExit("bench/slow_link.py cannot run here; it needs " + "; ".join(problems))
    results = []
    try:
        set_up_link(args.rate)
        for index, mode in enumerate(args.modes):
            print(f"mode {mode} ...", flush=True)
            results.append(run_mode(args, mode, port=29700 + index))
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"setting up the link failed: {' '.join(error.cmd)}\n{error.stderr}")
    finally:
        teardown()
    baseline = next((r for r in results if r["mode"] == "ddp" and r["reached"]), None)
    floor = next((r for r in results if r["mode"] == "none" and r["reached"]), None)
    print(f"\n2 ranks, link {args.rate} (tbf), target loss {args.target_loss}")
    print(
        f"{'mode':<42}{'reached':>8}{'steps':>7}{'syncs':>7}{'wall s':>9}{'final loss':>12}{'x faster':>10}"
        f"{'x floor':>9}{'link MB':>10}{'MB/sync':>9}"
    )
    for r in results:
        speedup = f"{baseline['seconds'] / r['seconds']:.2f}" if baseline and r["reached"] else "-"
        over_floor = f"{r['seconds'] / floor['seconds']:.2f}" if floor and r["reached"] else "-"
        name = describe_mode(r["mode"])
        print(
            f"{name:<42}{str(r['reached']):>8}{r['steps']:>7}{r['syncs']:>7}{r['seconds']:>9.2f}"
            f"{r['final_loss']:>12.4f}{speedup:>10}{over_floor:>9}{r['link_bytes'] / 1e6:>10.1f}"
            f"{r['link_bytes'] / 1e6 / r['syncs'] if r['syncs'] else 0:>9.2f}"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "slow_link.json"), "w") as f:
        recorded = {"rate": args.rate, "target_loss": args.target_loss, "hidden": args.hidden, "results": results}
        json.dump(recorded, f, indent=1)
    png = os.path.join(args.out, "slow_link.png")
    plot(results, png, args.rate, args.target_loss, args.hidden)
    print(f"wrote {os.path.join(args.out, 'slow_link.json')} and {png}")


if __name__ == "__main__":
    main()
