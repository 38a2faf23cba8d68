"""Run an unmodified Accelerate script with localsgd_ext's LocalSGD in place of Accelerate's.

    torchrun --nproc-per-node 2 -m localsgd_ext.patch train.py --local_sgd_steps 8
    accelerate launch -m localsgd_ext.patch train.py --local_sgd_steps 8
    python -m localsgd_ext.patch train.py ...
    torchrun --nproc-per-node 2 -m localsgd_ext.patch -m mypackage.train --local_sgd_steps 8

or, from Python, before the script's own imports run: `localsgd_ext.patch_accelerate()`.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

__all__ = ["patch_accelerate", "main"]


def patch_accelerate() -> type:
    """Makes `accelerate.local_sgd.LocalSGD` (and `accelerate.LocalSGD`, where Accelerate exports it)
    localsgd_ext's `LocalSGD`, for every import that runs afterwards. Returns Accelerate's own class.
    Idempotent. Code that imported Accelerate's class before the call keeps it."""
    import accelerate
    import accelerate.local_sgd

    from .local_sgd import LocalSGD

    original = getattr(accelerate.local_sgd, "_localsgd_ext_original", accelerate.local_sgd.LocalSGD)
    accelerate.local_sgd._localsgd_ext_original = original
    accelerate.local_sgd.LocalSGD = LocalSGD
    if hasattr(accelerate, "LocalSGD"):
        accelerate.LocalSGD = LocalSGD
    return original


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    as_module = argv[0] == "-m"
    if as_module and len(argv) < 2:
        print("localsgd_ext.patch: -m needs a module name (as python -m does)", file=sys.stderr)
        raise SystemExit(2)
    target = argv[1] if as_module else argv[0]
    arguments = argv[2:] if as_module else argv[1:]
    if not as_module and not os.path.exists(target):
        # Python's own words for a script that is not there.
        message = f"can't open file {os.path.abspath(target)!r}: [Errno 2] No such file or directory"
        print(f"{sys.executable}: {message}", file=sys.stderr)
        raise SystemExit(2)
    patch_accelerate()
    if os.environ.get("RANK", "0") == "0":  # once per job, not once per rank
        what = f"module {target}" if as_module else target
        print(f"localsgd_ext.patch: running {what} with localsgd_ext.LocalSGD as accelerate.local_sgd.LocalSGD", file=sys.stderr)
    # The script or module sees itself as __main__ with its own arguments, as if run directly.
    if as_module:
        sys.argv = [target, *arguments]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    sys.argv = [target, *arguments]
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
