#!/usr/bin/env bash
# Sets up this checkout and leaves its Python at .venv/bin/python (the README's commands run that one):
#   - inside an active virtualenv or conda environment whose torch imports, .venv is a link to that
#     environment: localsgd_ext is built against its torch, and only packages it lacks are installed
#     (nothing it has is re-pinned);
#   - otherwise (a bare machine, a system Python), .venv is a new virtual environment with the pinned
#     dependencies of requirements.txt (torch 2.13.0, ...).
# Then localsgd_ext is built and installed in editable mode. Re-running is cheap: the build is skipped
# while the compiled module is newer than every source.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PIP_ROOT_USER_ACTION=ignore
pip_quiet=(--quiet --disable-pip-version-check)

# torchft, for the fault-tolerance tests (localsgd_ext works without it, and those tests skip without it):
# installed into the project's own .venv when the package index has it.
install_fault_tolerance_extra() {
  if ! .venv/bin/python -c "import torchft" 2>/dev/null; then
    .venv/bin/python -m pip install "${pip_quiet[@]}" torchft==0.2.0 opentelemetry-api opentelemetry-sdk \
      opentelemetry-exporter-otlp-proto-http \
      || echo "bootstrap: torchft could not be installed here; the fault-tolerance tests will skip"
  fi
}

active_env="${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
if [ -n "$active_env" ] && [ "$(readlink -f "$active_env")" != "$repo/.venv" ] && "$active_env/bin/python" -c "import torch" 2>/dev/null; then
  # The user's environment: use it as it is.
  rm -rf .venv
  ln -s "$active_env" .venv
  torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  echo "bootstrap: using the active environment $active_env (torch $torch_version); installing only what it lacks"
  missing=$(.venv/bin/python - <<'EOF'
import importlib.metadata, re
for line in open("requirements.txt"):
    requirement = line.split("#")[0].strip()
    if not requirement:
        continue
    name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0]
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(requirement)
EOF
)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one requirement per word
    .venv/bin/python -m pip install "${pip_quiet[@]}" $missing
  fi
elif [ -x .venv/bin/python ] && [ ! -L .venv ]; then
  .venv/bin/python -m pip install "${pip_quiet[@]}" -r requirements.txt
  install_fault_tolerance_extra
else
  rm -rf .venv
  python=$(command -v python3 || command -v python || true)
  if [ -z "$python" ]; then
    echo "bootstrap: no python3 on PATH; install Python 3.10 or newer" >&2
    exit 1
  fi
  if ! "$python" -m venv .venv; then
    echo "bootstrap: '$python -m venv .venv' failed; on Debian or Ubuntu: apt install python3-venv" >&2
    exit 1
  fi
  echo "bootstrap: created .venv from $python; installing requirements.txt"
  .venv/bin/python -m pip install "${pip_quiet[@]}" -r requirements.txt
  install_fault_tolerance_extra
fi

module=$(ls localsgd_ext/_C*.so 2>/dev/null | head -n 1 || true)
stale=yes
if [ -n "$module" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$module" -type f)" ]; then
  # Importable from elsewhere, and from this checkout, with the torch it was built against.
  if (cd / && "$repo/.venv/bin/python" -c "import localsgd_ext, sys; sys.exit(not localsgd_ext.__file__.startswith('$repo/'))") 2>/dev/null; then
    stale=no
  fi
fi

if [ "$stale" = yes ]; then
  echo "bootstrap: building localsgd_ext (a few minutes on 2 cores)"
  # --no-build-isolation: compile against the torch of .venv, not a fresh one in a build env.
  MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/python -m pip install "${pip_quiet[@]}" --no-build-isolation --no-deps -e .
else
  echo "bootstrap: localsgd_ext is built and up to date"
fi
