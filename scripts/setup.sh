#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment in .venv and the DVC repo.
#   bash scripts/setup.sh          runtime + test dependencies
#   bash scripts/setup.sh --bench  also the benchmark-only dependencies (MONAI)
# Idempotent: a stamp keyed on the pins skips pip when nothing changed.
# Every version is pinned in requirements/constraints.txt (the one place for pins).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="dev"
[ "${1:-}" = "--bench" ] && extras="dev,bench"

export NO_ALBUMENTATIONS_UPDATE=1 DVC_NO_ANALYTICS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.vesselseg-$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)-${extras/,/-}"
if [ ! -f "$stamp" ]; then
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -qq -c requirements/constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install -qq -c requirements/constraints.txt -e ".[${extras}]"
  rm -f .venv/.vesselseg-*
  touch "$stamp"
fi

# A fresh clone has .dvc/ but a tarball or a copied folder may not: make it a repo.
if [ ! -d .git ]; then git init -q; fi
if [ ! -d .dvc ]; then .venv/bin/dvc init -q; fi
.venv/bin/dvc config core.analytics false
