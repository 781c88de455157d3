#!/usr/bin/env bash
# The GPU evidence run (docs/GPU.md): scripts/gpu_check.sh, then the inside core of the polyp design
# (iopfl, fedbn, ditto × seeds 0-2) on one GPU, within one wall-clock budget, as records in
# benchmarks/bench_quality.py's layout under benchmarks/results/quality-polyp-gpu/.
#
#   scripts/gpu_evidence.sh pack            # here, with the package index: wheels + the 128 px polyp pack
#                                           # into .gpu_pack/ (git-ignored; ~27 MiB, carried to the GPU)
#   scripts/gpu_evidence.sh run [-o K=V]... # on the GPU machine: everything, in at most $GPU_EVIDENCE_TOTAL_S
#   scripts/gpu_evidence.sh --smoke [DIR]   # the same path on the CPU at a tiny size (tests/test_gpu_evidence.py)
#
# run: installs the carried wheels (monai, nibabel, pydantic: the GPU image lacks them) for the machine's
# own python3 and torch, runs gpu_check.sh for at most $GPU_EVIDENCE_CHECK_S s (default 300; 0 skips it;
# its parts still going then are cut), then the inside core at fl.rounds=20 (the sizing: docs/GPU.md)
# in the time left of $GPU_EVIDENCE_TOTAL_S (default 540, inside a 600 s command): a run starts only
# while its expected time fits, runs still going at the end are stopped, finished records are kept.
# Extra `-o key=value` go to every run (e.g. -o fl.rounds=50, the CPU budget, with GPU_EVIDENCE_CHECK_S=0).
# With $OUT set (the device tool), the results and the log are bundled into $OUT/gpu-evidence.tar.gz.
# Scores are on the pack's 128×128 grid, not each frame's own size (the pack's PACK.json says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PACK=.gpu_pack
SOURCE=${GPU_EVIDENCE_SOURCE:-../shared/data}  # the polyp site folders (configs/polyp.yaml's data.root)
RESULTS=benchmarks/results/quality-polyp-gpu
WHEELS="monai nibabel pydantic pydantic_core annotated-types typing-inspection typing_extensions"
ROUNDS=20      # the GPU budget (docs/GPU.md, "Sizing"); configs/polyp.yaml has 50
ESTIMATE=90    # s: a run's expected time before one of its method has finished (twice the sized Ditto run)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

pinned() {  # NAME → NAME==VERSION from constraints.txt (the versions this project is tested with)
    grep -iE "^$1==" constraints.txt || { echo "gpu_evidence: $1 is not pinned in constraints.txt" >&2; exit 2; }
}

download_wheels() {  # for the GPU image's python 3.12 on x86-64 (.library device notes)
    rm -rf "$PACK/wheels"
    local specs=() name
    for name in $WHEELS; do specs+=("$(pinned "$name")"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$PACK/wheels" "${specs[@]}"
}

have_source() {
    [ -d "$SOURCE/Kvasir-SEG/images" ] && [ -d "$SOURCE/CVC-ClinicDB_jpg/images" ] \
        && [ -d "$SOURCE/BKAI-IGH_NeoPolyp-Small_subset200/images" ]
}

install_wheels() {  # the carried wheels, in front of the machine's own packages (its torch is kept)
    compgen -G "$PACK/wheels/*.whl" >/dev/null || return 0
    local site=/tmp/gpu-evidence-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$PACK"/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
}

quality() {  # PACK_DIR OUT WORK BUDGET ESTIMATE JOBS SEEDS [-o K=V]...
    local pack=$1 out=$2 work=$3 budget=$4 estimate=$5 jobs=$6 seeds=$7
    shift 7
    # the Python side stops its runs at the budget; this is the backstop
    timeout -k 10 $((budget + 60)) "$PY" benchmarks/gpu_evidence.py quality --pack "$pack" --out "$out" \
        --work "$work" --budget "$budget" --estimate "$estimate" --jobs "$jobs" --seeds "$seeds" "$@"
}

bundle() {  # DEST BASE FOLDER... → DEST/gpu-evidence.tar.gz of BASE/FOLDER... (the device tool brings
            # back at most 8 files, 2 folders down)
    local dest=$1 base=$2
    shift 2
    tar -czf "$dest/gpu-evidence.tar.gz" -C "$base" "$@"
    echo "gpu_evidence: $* (in $base) bundled into $dest/gpu-evidence.tar.gz"
}

evidence() {  # [-o K=V]...: gpu_check, then the inside core in the time left, then the bundle
    local start total=${GPU_EVIDENCE_TOTAL_S:-540} check=${GPU_EVIDENCE_CHECK_S:-300} status=0 left
    start=$(date +%s)
    install_wheels || return 2
    if [ "$check" -gt 0 ]; then
        echo "== gpu_check.sh (at most $check s)"
        timeout -k 10 "$check" bash scripts/gpu_check.sh "$PY" || status=1
    fi
    left=$((total - ($(date +%s) - start) - 20))  # 20 s for the tables and the bundle
    echo "== the inside core, $left s"
    quality "$PACK/polyp-128" "$RESULTS" "${IOPFL_BENCH_WORK:-/tmp/iopfl-bench}/quality-polyp-gpu" "$left" \
        "$ESTIMATE" 3 3 -o runtime.device=cuda -o "fl.rounds=$ROUNDS" "$@" || status=1
    if [ -n "${OUT:-}" ]; then
        bundle "$OUT" . "$RESULTS" $([ -d benchmarks/results/gpu ] && echo benchmarks/results/gpu)
    fi
    echo "gpu_evidence: done in $(($(date +%s) - start)) s (status $status)"
    return $status
}

case "${1:-}" in
pack)
    have_source || { echo "gpu_evidence: $SOURCE lacks the polyp site folders (set GPU_EVIDENCE_SOURCE)" >&2; exit 2; }
    mkdir -p "$PACK"
    download_wheels
    "$PY" benchmarks/gpu_evidence.py pack --source "$SOURCE" --dest "$PACK/polyp-128" --size 128
    echo "gpu_evidence: $(du -sh --apparent-size "$PACK" | cut -f1) in $PACK (carry it: carry=[\"$PACK\"])"
    ;;
run)
    shift
    if [ ! -d "$PACK/polyp-128" ]; then
        echo "gpu_evidence: no $PACK/polyp-128: run 'scripts/gpu_evidence.sh pack' first" >&2
        exit 2
    fi
    LOG=${OUT:-$RESULTS}/gpu-evidence.log
    mkdir -p "$(dirname "$LOG")"
    set +e
    evidence "$@" 2>&1 | tee "$LOG"
    exit "${PIPESTATUS[0]}"
    ;;
--smoke)
    DIR=${2:-$(mktemp -d)}
    mkdir -p "$DIR"
    if have_source; then from=(--source "$SOURCE"); else from=(--synthetic); fi
    "$PY" benchmarks/gpu_evidence.py pack "${from[@]}" --dest "$DIR/pack" --size 32 --frames 12
    quality "$DIR/pack" "$DIR/results/quality-polyp-gpu" "$DIR/work" 240 60 1 1 -o runtime.device=cpu \
        -o data.image_size=32 -o fl.rounds=2 -o eval.eval_every=2 -o model.width=4 -o eval.overlays=0 \
        -o "data.cache_dir=$DIR/cache"
    bundle "$DIR" "$DIR" results
    ;;
*)
    sed -n '2,9p' "$0" >&2
    exit 2
    ;;
esac
