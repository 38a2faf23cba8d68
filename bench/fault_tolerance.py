"""A replica killed mid-training (SIGKILL) and restarted, against the same training uninterrupted:
examples/train_digits_ft.py on 3 replica processes (min 2 per quorum) joined by a torchft lighthouse on
loopback. Reports the wall time of each run, each replica's final loss and accuracy, the steps the killed
replica lost, the time from its restart to its first committed sync (healed), and how many syncs the two
others committed while it was down.

    python bench/fault_tolerance.py [--steps 400] [--kill-at 96] [--down-seconds 2] [--out bench/results/fault_tolerance.json]
    python bench/fault_tolerance.py --example-args "--wire int8 --sync-delay 2 --outer-optimizer diloco --merge streaming"

Needs the `ft` extra (pip install 'localsgd_ext[ft]').
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "train_digits_ft.py")
LINE = re.compile(r"replica (\d+) step (\d+) quorum (\d+) committed (True|False)")
DONE = re.compile(r"replica (\d+) done: steps (\d+) syncs (\d+) train loss ([\d.]+) test accuracy ([\d.]+) seconds ([\d.]+)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--local-sgd-steps", type=int, default=8)
    parser.add_argument("--kill-at", type=int, default=96, help="the killed replica's step at which it is killed")
    parser.add_argument("--down-seconds", type=float, default=2.0)
    parser.add_argument("--step-seconds", type=float, default=0.01, help="sleep per step, so a run lasts a few seconds")
    parser.add_argument(
        "--example-args", default="", help='more flags for examples/train_digits_ft.py, e.g. "--wire int8 --sync-delay 2"'
    )
    parser.add_argument("--out", default=None)
    return parser.parse_args()


class Replica:
    """One replica process, its output lines timestamped as they arrive."""

    def __init__(self, index, lighthouse, args):
        command = [sys.executable, "-u", EXAMPLE, "--replica-id", str(index), "--replicas", str(args.replicas)]
        command += ["--lighthouse", lighthouse, "--steps", str(args.steps), "--local-sgd-steps", str(args.local_sgd_steps)]
        command += ["--step-seconds", str(args.step_seconds)] + args.example_args.split()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.perf_counter(), line.strip()))

    def syncs(self):
        return [(t, int(m[2]), m[4] == "True") for t, line in self.lines if (m := LINE.match(line))]

    def done(self):
        for _, line in self.lines:
            if m := DONE.match(line):
                return {"steps": int(m[2]), "syncs": int(m[3]), "loss": float(m[4]), "accuracy": float(m[5])}
        return None


def run(args, kill: bool):
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=2000, heartbeat_timeout_ms=1000)
    start = time.perf_counter()
    replicas = [Replica(i, lighthouse.address(), args) for i in range(args.replicas)]
    victim = args.replicas - 1
    record = {"kill": kill}
    try:
        if kill:
            while not any(step >= args.kill_at for _, step, _ in replicas[victim].syncs()):
                time.sleep(0.01)
            last_committed = max(step for _, step, ok in replicas[victim].syncs() if ok)
            replicas[victim].process.send_signal(signal.SIGKILL)
            killed_at = time.perf_counter()
            replicas[victim].process.wait()
            record["killed_at_step"] = max(step for _, step, _ in replicas[victim].syncs())
            record["steps_lost"] = record["killed_at_step"] - last_committed
            time.sleep(args.down_seconds)
            restarted = Replica(victim, lighthouse.address(), args)
            others = [s for r in replicas[:victim] for s in r.syncs() if killed_at <= s[0] <= restarted.started]
            record["syncs_committed_by_others_while_down"] = len([s for s in others if s[2]]) // max(1, victim)
            replicas[victim] = restarted
        for r in replicas:
            r.process.wait(timeout=600)
            r.reader.join(timeout=10)
    finally:
        for r in replicas:
            if r.process.poll() is None:
                r.process.kill()
        lighthouse.shutdown()
    record["seconds"] = time.perf_counter() - start
    record["replicas"] = [r.done() for r in replicas]
    if kill:
        healed = [t for t, _, ok in replicas[victim].syncs() if ok]
        record["seconds_to_heal"] = (healed[0] - replicas[victim].started) if healed else None
        record["healed_to_step"] = next((step for _, step, ok in replicas[victim].syncs() if ok), None)
    return record


def main():
    args = parse_args()
    results = {"args": vars(args), "runs": [run(args, kill=False), run(args, kill=True)]}
    for r in results["runs"]:
        finals = ", ".join(f"{d['loss']:.4f}/{d['accuracy']:.3f}" if d else "did not finish" for d in r["replicas"])
        name = "killed + restarted" if r["kill"] else "uninterrupted"
        line = f"{name:>20}: {r['seconds']:.1f} s, loss/accuracy per replica {finals}"
        if r["kill"]:
            healed = (
                f"healed to step {r['healed_to_step']} {r['seconds_to_heal']:.2f} s after its restart"
                if r["seconds_to_heal"] is not None
                else "not healed before the others finished (run longer, or restart sooner)"
            )
            line += (
                f"; killed at step {r['killed_at_step']} ({r['steps_lost']} local steps lost), others committed "
                f"{r['syncs_committed_by_others_while_down']} syncs while it was down, {healed}"
            )
        print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
