#!/usr/bin/env bash
# The install check of docs/DEPLOY.md: build the wheel, install it with its dependencies into an
# empty virtual environment (as a hospital's IT department would), then, outside the checkout, run a
# small `iopfl demo` and a loopback Flower deployment of the packaged app with the commands of
# docs/DEPLOY.md (a SuperLink and two SuperNodes on 127.0.0.1, `flwr run "$(iopfl flower app)"`).
#
#   scripts/wheel_check.sh [WORKDIR]      # default: a new temporary folder; PYTHON=python3.11
#
# Needs Python 3.11 and the package index (pip installs the pinned dependencies, several minutes the
# first time). Every Flower process binds to 127.0.0.1 and is stopped by its PID when the script
# ends, also on failure. Exit code 0 and "wheel check passed" when everything worked.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3.11}
WORK=$(realpath -m "${1:-$(mktemp -d -t iopfl-wheel-XXXXXX)}")
mkdir -p "$WORK"
cd "$WORK"
unset PYTHONPATH
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_HOME=$WORK/flwr-home IOPFL_CACHE=$WORK/cache

echo "== build the wheel (from a copy of the sources: a stale build/ folder cannot leak into it)"
rm -rf source dist
mkdir source
cp "$ROOT/pyproject.toml" "$ROOT/README.md" source/
cp -r "$ROOT/src" source/src
find source \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps -w dist ./source
WHEEL=$(ls "$WORK"/dist/iopfl-*.whl)
echo "$WHEEL"

echo "== install it into an empty virtual environment"
rm -rf venv
"$PY" -m venv venv
venv/bin/python -m pip install -q -c "$ROOT/constraints.txt" "$WHEEL[flower]"
export PATH=$WORK/venv/bin:$PATH
venv/bin/python - "$WORK/venv" <<'EOF'
import sys
from pathlib import Path
import iopfl
assert Path(iopfl.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), f"iopfl from {iopfl.__file__}"
EOF

TINY="data.image_size=32;model.width=4;model.depth=2;fl.rounds=1;eval.eval_every=1;eval.overlays=0;runtime.threads=1"

echo "== iopfl demo (3 synthetic sites, 32 px, 1 round)"
DEMO=()
for o in ${TINY//;/ } data.synthetic.sites=3 data.synthetic.cases=3 data.synthetic.size=32 data.synthetic.slices=4; do
  DEMO+=(-o "$o")
done
iopfl demo --out runs/demo "${DEMO[@]}" > demo.log 2>&1 || { tail -30 demo.log; exit 1; }
test -s runs/demo/report.md && grep -q "Outside: unseen site" runs/demo/report.md
echo "demo written to $WORK/runs/demo"

echo "== loopback Flower deployment of the packaged app"
APP=$(iopfl flower app)
CONFIG=$(iopfl configs)/demo.yaml
iopfl synth "$WORK/data/synth2" --sites 2 --cases 3 --size 32 --slices 4
free_port() {  # a port the kernel hands out on 127.0.0.1 (free at this moment)
  venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}
PORT=$(free_port)
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$PORT"
insecure = true
TOML

PIDS=""  # SuperNodes first, the SuperLink last; each leads its own process group (setsid)
stop_all() {
  for pid in $PIDS; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in $PIDS; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
setsid flower-superlink --insecure --host 127.0.0.1 --port "$PORT" \
  --disable-runtime-dependency-installation > superlink.log 2>&1 &
PIDS=$!
i=0
for s in SiteA SiteB; do
  i=$((i + 1))
  NODE_PORT=$(free_port)
  setsid flower-supernode --insecure --superlink "127.0.0.1:$PORT" --host 127.0.0.1 --port "$NODE_PORT" \
    --node-config "site='$s' data-root='$WORK/data/synth2' state-dir='$FLWR_HOME/state-$s'" \
    > "supernode-$s.log" 2>&1 &
  PIDS="$! $PIDS"
done

online() {
  flwr supernode ls local --format json 2>/dev/null | venv/bin/python -c \
    "import json, sys; print(sum(str(n.get('status', '')).lower() == 'online' for n in json.load(sys.stdin).get('nodes', [])))" \
    2>/dev/null || echo 0
}
for _ in $(seq 120); do [ "$(online)" = 2 ] && break; sleep 1; done
[ "$(online)" = 2 ] || { echo "SuperNodes not online"; tail -20 superlink.log supernode-*.log; exit 1; }

flwr run "$APP" local --stream --run-config \
  "config='$CONFIG' run-dir='$WORK/runs/flower' nodes=2 overrides='data.source=prostate;data.root=$WORK/data/synth2;$TINY'" \
  > flwr-run.log 2>&1 || { tail -30 flwr-run.log; exit 1; }
STATUS=""
for _ in $(seq 60); do
  STATUS=$(flwr ls local --format json | venv/bin/python -c \
    "import json, sys; print(json.load(sys.stdin)['runs'][0]['status'])")
  case $STATUS in finished*) break ;; esac
  sleep 1
done
[ "$STATUS" = "finished:completed" ] || { echo "run status: $STATUS"; tail -30 flwr-run.log; exit 1; }
test -s runs/flower/results.json
echo "deployment run written to $WORK/runs/flower (status $STATUS)"
echo "wheel check passed ($WORK)"
