"""Run an unmodified Accelerate script with localsgd_ext's LocalSGD in place of Accelerate's.

    torchrun --nproc-per-node 2 -m localsgd_ext.patch train.py --local_sgd_steps 8
    accelerate launch -m localsgd_ext.patch train.py --local_sgd_steps 8
    python -m localsgd_ext.patch train.py ...

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
    script = argv[0]
    patch_accelerate()
    print(f"localsgd_ext.patch: running {script} with localsgd_ext.LocalSGD as accelerate.local_sgd.LocalSGD", file=sys.stderr)
    # The script sees itself as __main__ with its own arguments, as if run directly.
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
