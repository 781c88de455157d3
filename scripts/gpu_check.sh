#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (docs/gpus.md); about 5-8 minutes on one H100/H200.
#   (a) the device tests on CUDA (tests/test_devices.py and the routing/adaptation device tests),
#   (b) benchmarks/bench_train.py --device cuda at the demo and the published size
#       (plain GPU loop vs ours in fp32, fp32 channels-last, bf16, bf16 channels-last, with torch.compile),
#   (c) benchmarks/device_agreement.py: one published-size round (384 px, width 32) on the CPU and on
#       the GPU, whose first-round losses must agree within 1e-3 (relative).
# Everything it measures is written under benchmarks/results/gpu/ (JSON + markdown), plus the logs.
#
#   scripts/gpu_check.sh [PYTHON]        # default: .venv/bin/python if present, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

"$PY" - <<'EOF' || { echo "gpu_check: torch sees no CUDA device; nothing to check" >&2; exit 2; }
import torch, sys
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"device: {torch.cuda.get_device_name(0) if ok else 'none'}")
sys.exit(0 if ok else 1)
EOF

status=0
echo "== (a) device tests on CUDA"
timeout 240 "$PY" -m pytest -q -rs tests/test_devices.py -k cuda 2>&1 | tee "$OUT/device_tests.log" || status=1
echo "== (b) training speed on CUDA"
timeout 240 "$PY" benchmarks/bench_train.py --device cuda --rounds 4 --out "$OUT" 2>&1 | tee "$OUT/bench_train.log" || status=1
echo "== (c) CPU and GPU agree on a published-size round"
timeout 180 "$PY" benchmarks/device_agreement.py --devices cpu cuda --out "$OUT" 2>&1 | tee "$OUT/device_agreement.log" || status=1
echo "gpu_check: results in $OUT (status $status)"
exit $status
