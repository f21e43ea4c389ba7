#!/usr/bin/env bash
# Create (or reuse) the Python environment and link it at ./.venv.
# The environment is cached per requirements.txt hash under ~/.cache/raddiag so that CI
# and later checkouts reuse it; `raddiagseg` is installed editable from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
hash=$(cat requirements.txt | sha1sum | cut -c1-12)
venv=${RADDIAG_VENV:-$HOME/.cache/raddiag/venv-$hash}
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating $venv (first time: several minutes)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r requirements.txt
  touch "$venv/.complete"
fi
test_hash=$(cat requirements-test.txt | sha1sum | cut -c1-12)
if [ ! -f "$venv/.test-$test_hash" ]; then
  echo "[setup] installing test dependencies (requirements-test.txt)"
  "$venv/bin/pip" install -q -r requirements-test.txt -c <("$venv/bin/pip" freeze --exclude-editable)
  rm -f "$venv"/.test-*
  touch "$venv/.test-$test_hash"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e trainer
if [ ! -e .venv ] || [ "$(readlink .venv)" != "$venv" ]; then
  rm -rf .venv
  ln -s "$venv" .venv
fi
echo "[setup] environment ready: .venv -> $venv"
