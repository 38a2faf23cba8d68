#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: installs the pinned dependencies, then builds localsgd_ext
# against the installed torch and installs it in editable mode. Re-running is cheap: the build is
# skipped while the compiled module is newer than every source.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PIP_ROOT_USER_ACTION=ignore

python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# `python -m pip` does not refresh pyenv's shims: without this, the `torchrun` and `ninja` just installed
# are not on PATH on a fresh pyenv machine.
if command -v pyenv >/dev/null 2>&1; then
  pyenv rehash
fi

module=$(ls localsgd_ext/_C*.so 2>/dev/null | head -n 1 || true)
stale=yes
if [ -n "$module" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$module" -type f)" ]; then
  # Importable from elsewhere, and from this checkout: the editable install is in place.
  if (cd / && python -c "import localsgd_ext, sys; sys.exit(not localsgd_ext.__file__.startswith('$repo/'))") 2>/dev/null; then
    stale=no
  fi
fi

if [ "$stale" = yes ]; then
  echo "bootstrap: building localsgd_ext (about a minute on 2 cores)"
  # --no-build-isolation: compile against the torch installed above, not a fresh one in a build env.
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
else
  echo "bootstrap: localsgd_ext is built and up to date"
fi
