"""Entry point of one rank started by multiprocess.run_ranks: runs the target, saves its result."""

import gc
import importlib
import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    target, args_json, out_dir = sys.argv[1:4]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(*json.loads(args_json))
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    del result
    release_process_groups()
    # The result is saved and the group destroyed. gloo's worker threads can still abort the interpreter's
    # finalization ("terminate called without an active exception"; seen once in a full suite, on the rank
    # that raised its own error in test_a_local_failure_is_reported_as_local_on_its_rank_and_named_on_the_others,
    # not in 12 reruns), which would fail a rank whose work is done: nothing is left to finalize.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def release_process_groups() -> None:
    """A ProcessGroup still referenced at interpreter exit can abort in gloo's threads ("terminate called
    without an active exception"). Accelerate's singletons and the DDP wrappers it prepared (often in
    reference cycles) hold the group: drop them, collect, then destroy it while Python is alive."""
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    main()
