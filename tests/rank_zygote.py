"""A process that imports what every rank needs (torch, Accelerate, localsgd_ext) once, then forks each
rank that multiprocess.run_ranks asks for, so that a launch does not pay those imports (1.5-2 s of CPU
per rank) again. Each child is a fresh copy of this process: it has run no test, holds no thread and no
process group, and runs exactly what `python -m rank_main` would.

Protocol, one JSON object per line: on stdin {"argv": [...], "env": {...}, "log": path, "status": path};
on stdout {"pid": N} once the child is forked. When a child ends, its wait status goes into its
"status" file ("exit N" or "signal N"), written whole (a rename), for run_ranks to poll.
"""

import json
import os
import select
import sys

# What the ranks import, loaded before any fork. Nothing here may start a thread or a process group.
import accelerate  # noqa: E402, F401
import accelerate.utils  # noqa: E402, F401
import torch  # noqa: E402, F401
import torch.distributed  # noqa: E402, F401

import localsgd_ext  # noqa: E402, F401
import localsgd_ext.local_sgd  # noqa: E402, F401


def _run_child(request: dict) -> None:
    """In the forked child: its own session (so run_ranks can kill its process group), its log as stdout
    and stderr, the rank's environment and argv, then rank_main."""
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # sys.stdout and sys.stderr write to descriptors 1 and 2, which now are the log.
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["rank_main", *request["argv"]]
        import rank_main

        rank_main.main()  # exits with os._exit(0) once the result is saved
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:  # noqa: BLE001 - the rank's own failure, reported in its log
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _write_status(path: str, status: int) -> None:
    text = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def main() -> None:
    status_paths = {}
    requests = sys.stdin
    while True:
        # Reap children between requests; a child's status file is written as soon as it ends.
        while status_paths:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in status_paths:
                _write_status(status_paths.pop(pid), status)
        ready, _, _ = select.select([requests], [], [], 0.05)
        if not ready:
            continue
        line = requests.readline()
        if not line:  # the test session ended
            return
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        status_paths[pid] = request["status"]
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
