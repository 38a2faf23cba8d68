"""Entry point of one rank started by multiprocess.run_ranks: runs the target, saves its result."""

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
    # Drop the group before exit: a ProcessGroup alive at interpreter exit can abort gloo's threads.
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
