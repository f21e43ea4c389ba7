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
  # deepspeed ships only a source distribution: build it against the venv's torch (no isolated build env that
  # would download torch again) and without its compiled ops (DS_BUILD_OPS=0; ZeRO-2 on CPU needs none)
  DS_BUILD_OPS=0 "$venv/bin/pip" install -q --no-build-isolation -r requirements-test.txt \
    -c <("$venv/bin/pip" freeze --exclude-editable)
  rm -f "$venv"/.test-*
  touch "$venv/.test-$test_hash"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e trainer
if [ ! -e .venv ] || [ "$(readlink .venv)" != "$venv" ]; then
  rm -rf .venv
  ln -s "$venv" .venv
fi
echo "[setup] environment ready: .venv -> $venv"
