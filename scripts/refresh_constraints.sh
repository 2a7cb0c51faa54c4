#!/usr/bin/env bash
# Rewrites constraints.txt: the versions that an unconstrained install of torch 2.13.0 (CPU) and
# `-e '.[test]'` resolves today, in a fresh virtual environment. Run it from anywhere, review the
# diff, and commit it with the change that needed it:  bash scripts/refresh_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -e '.[test,tensorboard]'
{
  echo "# Every package of a '.[test,tensorboard]' install plus torch 2.13.0, pinned at the versions"
  echo "# that resolved on $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version)."
  echo "# Install with: pip install torch==2.13.0 -c constraints.txt && pip install -c constraints.txt -e '.[test]'"
  echo "# Regenerate with: bash scripts/refresh_constraints.sh (never edit by hand)."
  # without local version labels: torch==2.13.0 is this machine's CPU wheel (2.13.0+cpu) here and
  # PyPI's build elsewhere; a +cpu pin would match nothing on PyPI
  "$venv/bin/pip" freeze --exclude-editable | grep -iv '^hanuman[-_]jax' | sed -E 's/\+[A-Za-z0-9.]+$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
