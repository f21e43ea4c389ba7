#!/usr/bin/env bash
# Install everything into ./.venv, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/raddiagseg describe --preset demo
