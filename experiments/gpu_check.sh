#!/usr/bin/env bash
# GPU check: parity, throughput and a 10^7-step extrapolation in one invocation (< 8 min).
#
#   bash experiments/gpu_check.sh            # on a machine with one GPU, from the repo root
#
# Runs, each under a `timeout` cut to what is left of an overall deadline (DEADLINE_S, 450 s):
#   1. environment: nvidia-smi, JAX's devices, MNIST from the offline cache;
#   2. parity: `pytest tests/test_train.py tests/test_sparse_pixels.py -k parity` with JAX on the
#      GPU (the torch reference stays on the CPU), JAX vs torch <= 1e-10 after 250-300 steps, dense
#      and with each set of skipped zero pixels, at weight decay 0 and 0.01;
#   3. throughput, in interleaved windows: experiments/benchmark.py --device gpu (JAX one seed,
#      the other skip_zero_pixels modes, 8 vmapped seeds, a 3 seeds x 2 weight decays sweep,
#      PyTorch eager on the GPU when torch sees CUDA, else that row is skipped, and variants of
#      the compiled chunk for a long lax.scan of tiny steps: command buffers (CUDA graphs) off,
#      command buffers with the while loop captured, scan unroll 2 and 8);
#   4. two real runs, experiments/run.py --steps LONG_STEPS (2e5) and SHORT_STEPS (2e4), with
#      the full evaluation schedule and checkpoints (without the in-loop monitor, which runs on
#      the host beside training); their difference gives the per-step time without compile,
#      evaluation and checkpoint costs, which is extrapolated to 10^7 steps.
# Writes $OUT/gpu_check.json (or results/gpu_check.json when OUT is unset) and a log beside it.
#
# Requirements on the GPU machine (it has no network):
#   - a CUDA jaxlib: elsewhere `pip install "jax[cuda12]"` (or "jax[cuda13]"); without a network
#     the wheels (jax-cuda*-plugin, jax-cuda*-pjrt and the nvidia-* libraries) must be carried
#     and installed with `pip install --no-index`.
#   - MNIST in the offline cache: copy ~/.cache/grokjax/mnist-uint8.npz (55 MB; an
#     np.savez_compressed copy of the same arrays, ~10 MB, also verifies) into a folder and
#     point GROKJAX_CACHE at it. The arrays are checked against pinned SHA-256 digests.
#   - the repository itself (this script sets PYTHONPATH to it; no install needed).
#
# Knobs (environment): PYTHON (python3), DEADLINE_S (450), LONG_STEPS (200000), SHORT_STEPS
# (20000), BENCH_ARGS (the benchmark's sizes), BENCH_VARIANTS (its chunk variants), PARITY_K (the
# parity tests' -k expression, "parity"), ALLOW_CPU=1 (dry run without a GPU; with tiny sizes:
# LONG_STEPS=600 SHORT_STEPS=200 BENCH_ARGS="--quick --seeds 1,8" PARITY_K="parity and 0.01").
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
RES=${OUT:-$ROOT/results}
mkdir -p "$RES"
LOG=$RES/gpu_check.log
JSON=$RES/gpu_check.json
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
DEADLINE_S=${DEADLINE_S:-450}
LONG_STEPS=${LONG_STEPS:-200000}
SHORT_STEPS=${SHORT_STEPS:-20000}
PARITY_K=${PARITY_K:-parity}
BENCH_ARGS=${BENCH_ARGS:-"--windows 5 --window-steps 10000 --seeds 1,8 --gemm-n 4096"}
BENCH_VARIANTS=${BENCH_VARIANTS:-"--variant nocmdbuf:xla_gpu_enable_command_buffer= \
--variant cmdbuf_while:xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL \
--variant unroll2:unroll=2 --variant unroll8:unroll=8"}
BENCH_ARGS="$BENCH_ARGS --sweep 3x0,0.01 $BENCH_VARIANTS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export GROKJAX_OFFLINE=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to torch in the same process
START=$(date +%s)
: >"$LOG"

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME CAP_S CMD...: runs CMD under timeout min(CAP_S, time left - 20 s); records rc and seconds.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE_S - ($(date +%s) - START) - 20))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        log "$name: skipped, no time left"
        echo "{\"rc\": null, \"ms\": 0, \"skipped\": true}" >"$TMP/$name.step"
        return 0
    fi
    log "$name: $* (timeout ${limit}s)"
    local t0 rc=0 ms
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    log "$name: rc=$rc after ${ms} ms"
    echo "{\"rc\": $rc, \"ms\": $ms, \"skipped\": false, \"timeout_s\": $limit}" >"$TMP/$name.step"
}

cat >"$TMP/env_check.py" <<EOF
import grokjax, jax
print("jax", jax.__version__, "devices", jax.devices())
if jax.default_backend() != "gpu" and "${ALLOW_CPU:-0}" != "1":
    raise SystemExit("JAX sees no GPU: install a CUDA jaxlib (see the header of this script)")
from grokjax.data import load_mnist
load_mnist(verbose=True)
print("MNIST ok")
EOF
(nvidia-smi || echo "nvidia-smi: not available") >>"$LOG" 2>&1
step env 60 "$PY" "$TMP/env_check.py"
if [[ $(grep -o '"rc": [0-9]*' "$TMP/env.step") != '"rc": 0' ]]; then
    log "environment check failed; see $LOG"
fi

step parity 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_sparse_pixels.py -k "$PARITY_K"

TORCH_DEV=cpu
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>>"$LOG"; then
    TORCH_DEV=gpu
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
if [[ $TORCH_DEV == gpu ]]; then
    step bench 200 "$PY" experiments/benchmark.py --device gpu $BENCH_ARGS --json "$TMP/bench.json"
else
    log "torch sees no CUDA device: benchmarking JAX only"
    step bench 200 "$PY" experiments/benchmark.py --skip-torch $BENCH_ARGS --json "$TMP/bench.json"
fi

step run_long 150 "$PY" experiments/run.py --steps "$LONG_STEPS" --out "$TMP/run_long" --progress false --monitor false
step run_short 90 "$PY" experiments/run.py --steps "$SHORT_STEPS" --out "$TMP/run_short" --progress false --monitor false

"$PY" - "$TMP" "$JSON" "$LONG_STEPS" "$SHORT_STEPS" "$TORCH_DEV" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
tmp, out, n_long, n_short, torch_dev = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
steps = {}
for name in ("env", "parity", "bench", "run_long", "run_short"):
    try:
        steps[name] = json.load(open(os.path.join(tmp, name + ".step")))
        steps[name]["seconds"] = steps[name].pop("ms") / 1000
    except (OSError, ValueError):
        steps[name] = {"rc": None, "skipped": True}
bench = None
try:
    bench = json.load(open(os.path.join(tmp, "bench.json")))
except (OSError, ValueError):
    pass
res = {"steps": steps, "torch_device": torch_dev, "benchmark": bench, "goals": {}}
N = 10_000_000
long_ok = steps["run_long"].get("rc") == 0
short_ok = steps["run_short"].get("rc") == 0
if long_ok:
    t_long = steps["run_long"]["seconds"]
    ex = {"long_steps": n_long, "long_s": t_long, "naive_1e7_s": t_long * N / n_long}
    if short_ok and n_long > n_short:
        per_step = (t_long - steps["run_short"]["seconds"]) / (n_long - n_short)
        fixed = steps["run_short"]["seconds"] - per_step * n_short
        ex.update(short_steps=n_short, short_s=steps["run_short"]["seconds"], per_step_s=per_step,
                  steps_per_s=1 / per_step if per_step > 0 else None, fixed_s=fixed,
                  two_point_1e7_s=fixed + per_step * N)
    res["extrapolation"] = ex
    best = ex.get("two_point_1e7_s", ex["naive_1e7_s"])
    res["goals"]["1e7_steps_le_200s"] = {"value_s": best, "met": best <= 200}
if bench:
    one = bench["jax"]["median"]
    res["goals"]["one_seed_ge_50000_steps_per_s"] = {"value": one, "met": one >= 50_000}
    if (bench.get("seeds") or {}).get("8"):
        agg8, agg1 = bench["seeds"]["8"]["median"], (bench["seeds"].get("1") or bench["jax"])["median"]
        res["goals"]["8_seeds_ge_6x_one_seed"] = {"value": agg8 / agg1, "met": agg8 >= 6 * agg1}
    sweep = (bench.get("sweep") or {}).get("rate")
    if sweep:
        res["goals"]["sweep_3x2_ge_4x_one_seed"] = {"value": sweep["median"] / one, "met": sweep["median"] >= 4 * one}
    res["contenders"] = {k: v["median"] for k, v in [("jax", bench["jax"]), ("torch", bench.get("reference")),
                                                     *(bench.get("modes") or {}).items(),
                                                     *(("variant_" + k, v) for k, v in (bench.get("variants") or {}).items())]
                         if v}
    res["failed_contenders"] = bench.get("failed", {})
res["parity_passed"] = steps["parity"].get("rc") == 0
with open(out, "w") as f:
    json.dump(res, f, indent=2)
print(json.dumps({"parity_passed": res["parity_passed"], "goals": res["goals"],
                  "contenders": res.get("contenders"), "failed_contenders": res.get("failed_contenders"),
                  "extrapolation": res.get("extrapolation")}, indent=2))
EOF
log "results: $JSON (log: $LOG)"
