#!/usr/bin/env bash
# The one script to run on the GPU machine, from the repository root:
#
#   OUT=/path/for/logs bash scripts/gpu_suite.sh [STAGE ...]
#
# Stages, in order (default: env peers build test check bench):
#   env          nvidia-smi and `python -m ssmkernels info`
#   peers        unpack the peer libraries from .peers/ (see scripts/prepare_peers.sh) into
#                $PEERS_DIR: fla + einops wheels, the mamba_ssm sdist (its Triton ops need no build)
#   peers-build  compile causal_conv1d and mamba_ssm's CUDA selective scan for sm_90 only (opt-in;
#                PEERS_BUILD="causal_conv1d" picks one). scripts/patch_peer_build.py trims them to the
#                bfloat16 instances the bench calls (their full builds: ~7 and ~3 min on 16 cores;
#                PEERS_ALL_DTYPES=1 builds everything). PEERS_SAVE=DIR copies the built
#                extensions (debug info stripped) there: bring them back into .peers/built and carry
#                .peers, and later calls import them without building
#   build        compile the ssmkernels CUDA extension into the JIT cache, timed (MAX_JOBS=16)
#   test         the whole pytest suite, GPU tests included: pytest -m "gpu or not gpu"
#   check        python -m ssmkernels check (every primitive/feature/backend vs float64)
#   bench        python -m ssmkernels bench --compare, with JSON, Markdown and PNG output
#   benchmarks   the pytest-benchmark wrappers in benchmarks/ (opt-in)
#   robustness   python -m ssmkernels robustness: cold/warm first calls, batch invariance, prefill vs
#                decode, 256K-token fwd+bwd vs float64, deterministic-mode cost, compute-sanitizer memcheck (opt-in; about 4 min
#                plus the sanitizer; ROBUSTNESS_ARGS e.g. "--quick" or "--only long,sanitizer")
#   model        hybrid-model training/decode benchmarks into $OUT/model (opt-in; MODEL_ARGS)
#   demo         the phonebook-recall demo, --size small, JSON + plot (opt-in; DEMO_ARGS e.g. "--steps 600")
#
# First calls compile and autotune Triton kernels (ours and mamba_ssm's), so `bench` over every case
# can outlast a 10-minute command: split it, e.g. BENCH_ARGS="--primitive ssd" BENCH_NAME=bench-ssd.
#
# Each stage logs to $OUT/<stage>.log; $OUT/summary.txt gets one line per stage (exit code,
# seconds). The peers' paths are put on PYTHONPATH for every later stage, so a command that runs
# out of time can be split: `... gpu_suite.sh peers build test`, then `... gpu_suite.sh peers check bench`.
#
# For machines that hand back only a few files (the device tool: 8 from $OUT): BUNDLE=1 keeps every
# log and JSON in a scratch folder and leaves $OUT/summary.txt plus one $OUT/logs.tgz, also when a
# stage fails or the command is cut short by a signal. STAGE_TIMEOUT=SECONDS stops a stage that runs
# longer (exit 124 in the summary) so that the later stages still run.
# Exit code: 0 when every stage that ran succeeded, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_logs}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "${BUNDLE:-}" ]; then
    BUNDLE_OUT=$OUT
    OUT=$(mktemp -d /tmp/gpu_suite.XXXXXX)
    bundle() {
        cp -f "$OUT/summary.txt" "$BUNDLE_OUT/summary.txt" 2>/dev/null
        tar -czf "$BUNDLE_OUT/logs.tgz" -C "$OUT" . 2>/dev/null
    }
    trap bundle EXIT
    trap 'exit 143' TERM INT
fi
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/ssmkernels-peers}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env peers build test check bench)
FAILED=0
BASE_PYTHONPATH=${PYTHONPATH:-}

log() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

run_stage() {  # run_stage NAME COMMAND...: logs to $OUT/NAME.log, records rc and time
    local name=$1; shift
    log "$name: start ($*)"
    local start=$SECONDS
    if [ -n "${STAGE_TIMEOUT:-}" ]; then
        # A shell function cannot be handed to timeout(1): run the stage as its own process group
        # (job control on) and signal the whole group, its Python processes included.
        set -m
        ( "$@" ) > "$OUT/$name.log" 2>&1 &
        local pid=$!
        set +m
        ( sleep "$STAGE_TIMEOUT" && kill -TERM -- -"$pid" 2>/dev/null ) > /dev/null 2>&1 &
        local watchdog=$!
        wait "$pid"
        local rc=$?
        kill "$watchdog" 2>/dev/null
        [ $rc -eq 143 ] && rc=124 && echo "stopped after STAGE_TIMEOUT=${STAGE_TIMEOUT} s" >> "$OUT/$name.log"
    else
        ( "$@" ) > "$OUT/$name.log" 2>&1
        local rc=$?
    fi
    log "$name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
    tail -n 25 "$OUT/$name.log"
    [ $rc -ne 0 ] && FAILED=1
    return 0
}

peer_paths() {  # PYTHONPATH entries for whatever peers are unpacked (and built) in $PEERS_DIR
    local paths=""
    [ -d "$PEERS_DIR/site" ] && paths="$PEERS_DIR/site"
    # Peer extensions built by an earlier call (PEERS_SAVE) and carried back in .peers/built.
    [ -d "$ROOT/.peers/built" ] && paths="$paths:$ROOT/.peers/built"
    for src in "$PEERS_DIR"/src/mamba_ssm-* "$PEERS_DIR"/src/causal_conv1d-*; do
        [ -d "$src" ] && paths="$paths:$src"
    done
    echo "${paths#:}"
}

stage_env() {
    nvidia-smi || true
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PYTHON" -m ssmkernels info
}

stage_peers() {
    if ! ls "$ROOT"/.peers/* >/dev/null 2>&1; then
        echo "no .peers/ folder: run scripts/prepare_peers.sh on the development machine and carry .peers"
        return 1
    fi
    mkdir -p "$PEERS_DIR/site" "$PEERS_DIR/src"
    local wheels=("$ROOT"/.peers/*.whl)
    if [ -e "${wheels[0]}" ]; then
        "$PYTHON" -m pip install --quiet --no-deps --no-index --upgrade --target "$PEERS_DIR/site" "${wheels[@]}" || return 1
    fi
    for archive in "$ROOT"/.peers/*.tar.gz; do
        local name; name=$(basename "$archive" .tar.gz)
        [ -d "$PEERS_DIR/src/$name" ] || tar -xzf "$archive" -C "$PEERS_DIR/src" || return 1
    done
    ls "$PEERS_DIR/site" "$PEERS_DIR/src"
    PYTHONPATH="$(peer_paths)${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'PY'
from ssmkernels.bench import peers
for name, peer in peers.load().items():
    print(f"{name:14} {peer.version}  functions: {sorted(peer.functions)}  missing: {peer.errors}")
PY
}

stage_peers_build() {  # PEERS_BUILD: which peers (default "causal_conv1d mamba_ssm"); PEERS_SAVE: copy the .so there
    local names=${PEERS_BUILD:-causal_conv1d mamba_ssm} jobs pids=() rc=0
    local count; count=$(echo $names | wc -w)
    jobs=$(( MAX_JOBS / count > 0 ? MAX_JOBS / count : 1 ))
    for name in $names; do
        local src; src=$(ls -d "$PEERS_DIR"/src/${name}-* 2>/dev/null | head -1)
        [ -n "$src" ] || { echo "run the peers stage first ($name not unpacked)"; return 1; }
        # sm_90 only; bf16 instances only unless PEERS_ALL_DTYPES=1 (what the bench cases call)
        "$PYTHON" scripts/patch_peer_build.py "$src" ${PEERS_ALL_DTYPES:+--all-dtypes} || return 1
        ( cd "$src" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=$jobs \
            "$PYTHON" setup.py build_ext --inplace ) > "$OUT/peers-build-$name.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    echo "peer builds exit $rc"
    for name in $names; do ls -la "$PEERS_DIR"/src/${name}-*/*.so 2>/dev/null; done
    if [ -n "${PEERS_SAVE:-}" ]; then  # stripped copies, small enough to carry back as .peers/built
        mkdir -p "$PEERS_SAVE"
        for so in "$PEERS_DIR"/src/*/*.so; do
            [ -e "$so" ] && strip --strip-debug -o "$PEERS_SAVE/$(basename "$so")" "$so" && ls -la "$PEERS_SAVE/$(basename "$so")"
        done
    fi
    return $rc
}

stage_build() {
    "$PYTHON" -m ssmkernels build --jobs "$MAX_JOBS" --verbose
}

stage_test() {  # PYTEST_ARGS selects part of the suite (e.g. "tests/test_ssd_kernels.py")
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest -m "gpu or not gpu" -q -ra --durations=25 --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-}
}

stage_check() {
    "$PYTHON" -m ssmkernels check --json "$OUT/check.json"
}

stage_bench() {  # BENCH_ARGS filters (e.g. "--primitive ssd"); BENCH_NAME names the output files;
                 # BENCH_DETERMINISTIC=0 leaves out the deterministic-mode rows of fwd+bwd cases
    local name=${BENCH_NAME:-bench} deterministic=--deterministic
    [ "${BENCH_DETERMINISTIC:-1}" = 0 ] && deterministic=
    # shellcheck disable=SC2086
    "$PYTHON" -m ssmkernels bench --compare $deterministic --json "$OUT/$name.json" --markdown "$OUT/$name.md" \
        --plot "$OUT/$name.png" ${BENCH_ARGS:-}
}

stage_robustness() {  # ROBUSTNESS_ARGS: e.g. "--quick", "--only first-call,long"
    # shellcheck disable=SC2086
    "$PYTHON" -m ssmkernels robustness --json "$OUT/robustness.json" ${ROBUSTNESS_ARGS:-}
}

stage_model() {  # MODEL_ARGS: options of ssmkernels.models.bench, e.g. "--quick"
    # shellcheck disable=SC2086
    "$PYTHON" -m ssmkernels model --out "$OUT/model" ${MODEL_ARGS:-}
}

stage_demo() {  # DEMO_ARGS: options of the phonebook demo, e.g. "--steps 600"
    # shellcheck disable=SC2086
    "$PYTHON" -m ssmkernels demo phonebook --size small --json "$OUT/phonebook.json" --plot "$OUT/phonebook.png" \
        ${DEMO_ARGS:-}
}

stage_benchmarks() {
    "$PYTHON" -m pytest benchmarks/ -q --benchmark-json="$OUT/pytest-benchmark.json" \
        --benchmark-columns=median,iqr,rounds
}

log "stages: ${STAGES[*]} (OUT=$OUT, PEERS_DIR=$PEERS_DIR, MAX_JOBS=$MAX_JOBS)"
for stage in "${STAGES[@]}"; do
    # Peers unpacked by this or an earlier call are importable from here on.
    PEERS_PATH=$(peer_paths)
    export PYTHONPATH="$PEERS_PATH${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
    case "$stage" in
        env|peers|build|test|check|bench|benchmarks|robustness|model|demo) run_stage "$stage" "stage_$stage" ;;
        peers-build) run_stage "$stage" stage_peers_build ;;
        *) log "unknown stage $stage"; FAILED=1 ;;
    esac
done
log "done: $([ $FAILED -eq 0 ] && echo all stages passed || echo some stage failed)"
exit $FAILED
