#!/usr/bin/env bash
# Screenshot of a REDI flow run in the Prefect UI (headless Chromium) -> docs/img/prefect-run.png
#
#   scripts/ui_screenshot.sh [OUT.png]
#
# What it does (everything on 127.0.0.1, everything torn down on exit):
#   1. starts `prefect server start` on a free port with its own PREFECT_HOME in a temp folder
#      (PREFECT_SERVER_UI_API_URL set, or the UI on a non-4200 port cannot reach its API);
#   2. runs a small flow through that server: `redi stage evaluate` of a tiny recipe, base model only
#      (synthetic data, 2-layer model, HF generate backend; about a minute on 2 CPU cores);
#   3. opens the flow-run page (task graph + artifacts) and the run's metrics table artifact in headless
#      Chromium and saves both screenshots (OUT and OUT-artifact.png).
# Needs Debian's chromium (`apt-get install -y chromium`; installed here if missing and running as root).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/img/prefect-run.png}
PY=${PYTHON:-.venv/bin/python}
REDI=${REDI:-.venv/bin/redi}
CHROME=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROME" ]; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y chromium >/dev/null; CHROME=$(command -v chromium); else
    echo "chromium not found: apt-get install -y chromium" >&2; exit 1; fi
fi

WORK=$(mktemp -d)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_HOME="$WORK/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_UI_API_URL="http://127.0.0.1:$PORT/api"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill -INT -- "-$SERVER_PID" 2>/dev/null || true
  sleep 5; [ -n "$SERVER_PID" ] && kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$PORT/api/health" >/dev/null 2>&1 && break; sleep 1
done
curl -fs "http://127.0.0.1:$PORT/api/health" >/dev/null || { cat "$WORK/server.log"; exit 1; }
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

cat >"$WORK/recipe.yaml" <<YAML
run: {name: ui-demo, device: cpu, threads: 1, artifact_root: $WORK/artifacts}
data: {source: synthetic, synth: {n_train: 60, traces_per_problem: 4, n_test: 10, n_val: 0}}
model: {base: tiny, tiny: {hidden_size: 32, num_layers: 2, num_heads: 1, num_kv_heads: 1, intermediate_size: 64, vocab_size: 300, tokenizer_samples: 200}}
verify: {decontaminate: false, workers: 1}
evaluate: {backend: hf, n_samples: 2, max_new_tokens: 32, benchmarks: [demo_test], max_problems: 5, grade_workers: 1}
YAML
"$REDI" stage evaluate "$WORK/recipe.yaml" --labels base | tail -12

RUN_ID=$("$PY" - <<'PY'
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as c:
    print(c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0].id)
PY
)
URL="http://127.0.0.1:$PORT/runs/flow-run/$RUN_ID?tab=Artifacts"
mkdir -p "$(dirname "$OUT")"
"$CHROME" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$WORK/chrome" --virtual-time-budget=15000 \
  --screenshot="$OUT" --window-size=1400,900 "$URL" 2>/dev/null
echo "screenshot of $URL -> $OUT"
# and the run's metrics table artifact -> <OUT without .png>-artifact.png
ART_ID=$("$PY" - <<'PY'
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
with get_client(sync_client=True) as c:
    print(c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ui-demo-metrics"])))[0].id)
PY
)
ART_OUT="${OUT%.png}-artifact.png"
"$CHROME" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$WORK/chrome" --virtual-time-budget=15000 \
  --screenshot="$ART_OUT" --window-size=1400,900 "http://127.0.0.1:$PORT/artifacts/artifact/$ART_ID" 2>/dev/null
echo "screenshot of the ui-demo-metrics table artifact -> $ART_OUT"
