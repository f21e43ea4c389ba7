#!/usr/bin/env bash
# Install everything into ./.venv, start the RadDiag MONAI Label server on the bundled sample
# studies with the shipped demo model, ask it the 3-step question about each study, and keep
# serving for the RadDiag Slicer module (Ctrl+C stops it). DEMO_NO_SERVE=1: stop after the questions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PORT=${PORT:-8000}
MODEL=MONAILabelApp/model/raddiagseg-demo
if [ ! -f "$MODEL/config.json" ]; then
  echo "[demo] no demo model in $MODEL: build it with '.venv/bin/raddiagseg demo' (about 45 min on 2 CPU cores)" >&2
  exit 1
fi
LOG=$(mktemp -t raddiag-server.XXXXXX.log)
echo "[demo] starting the server on http://127.0.0.1:$PORT (log: $LOG)"
MONAI_LABEL_TRACKING_ENABLED=false .venv/bin/python -m monailabel.main start_server \
  --app MONAILabelApp --studies MONAILabelApp/sample-studies --conf models raddiagseg \
  --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$PORT/info/" >/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "[demo] the server stopped; its log:" >&2; tail -30 "$LOG" >&2; exit 1; fi
  sleep 1
done
PYTHONPATH=SlicerRadDiag/RadDiag .venv/bin/python scripts/demo_ask.py "http://127.0.0.1:$PORT"
if [ "${DEMO_NO_SERVE:-0}" = "1" ]; then exit 0; fi
echo
echo "[demo] serving http://127.0.0.1:$PORT - connect the RadDiag module in 3D Slicer (SlicerRadDiag/README.md). Ctrl+C stops."
wait $SERVER
