#!/usr/bin/env bash
# TOFU through PUM: a real `pum server` (model owner) and N `pum worker` processes (data owner)
# run the same inner method as scripts/tofu_unlearn.sh on m noisy copies per round; the merged
# model is downloaded through the admin API and scored with `pum eval`.
#
#   scripts/tofu_pum.sh                                             # CPU models, forget10, GradDiff
#   PUM_INNER_HANDLER=NPO PUM_NOISE_KAPPA=0.1 scripts/tofu_pum.sh
#   scripts/tofu_pum.sh NPO                                         # presets/tofu/NPO.yaml: open-unlearning's
#                                                                   # TOFU NPO settings and PUM's rounds for NPO
#   MODEL_DIR=/models/tofu_Llama-3.2-1B_full RETAIN_MODEL_DIR=/models/tofu_Llama-3.2-1B_retain90 \
#     N_WORKERS=4 scripts/tofu_pum.sh                               # one worker per GPU (CUDA_VISIBLE_DEVICES)
#
# Every knob is an environment variable. The baseline's (see scripts/tofu_unlearn.sh): MODEL_DIR,
# RETAIN_MODEL_DIR, DATA_DIR (or PUM_TOFU_DATA), FORGET_SPLIT (RETAIN_SPLIT derived),
# PUM_INNER_HANDLER, PUM_LOCAL_EPOCHS (the baseline's budget: each copy runs epochs/R), LR,
# BATCH_SIZE, WEIGHT_DECAY, SEED, HYPERPARAMS, MAX_NEW_TOKENS, EVAL_BATCH_SIZE, MAX_ITEMS, DEVICE
# (evaluation), THREADS, PUM_CPU_SPEC, PUM_TOFU_CPU_CACHE, PYTHON, RETAIN_EVAL_DIR. Then PUM's:
#   PUM_COPIES_M [4]  PUM_ROUNDS_R [2]  PUM_NOISE_KAPPA [0.01]  PUM_ALPHA_MIN [1]  PUM_ALPHA_MAX [2]
#   PUM_JITTER_TAU [0]  PUM_LOCAL_MAX_STEPS (steps per copy; empty = epochs/R) []
#   BASE_MODEL_DIR     the base the target was fine-tuned from: κ is then relative to the task vector
#                      θ − θ_base (the paper's definition) [the CPU base model; empty with MODEL_DIR given]
#   Any other PUM_* setting of DESIGN.md §8 in the environment is read by `pum admin create` too.
#   With METHOD (a preset of presets/tofu/), the job is the preset's: its hyperparameters, rounds, copies
#   and noise, with MODEL_DIR and TASK_NAME set on it, PUM_* variables in the environment over it, and on
#   the CPU models LR and PUM_LOCAL_EPOCHS (their CPU defaults, or yours) too; HYPERPARAMS='{"beta": 0.2}'
#   adds hyperparameters over the preset's.
#   N_WORKERS          worker processes [one per GPU; 2 without GPUs]
#   WORKER_THREADS     torch threads per CPU worker [1]
#   TASK_NAME          [tofu_${FORGET_SPLIT}_${PUM_INNER_HANDLER}_pum]
#   OUT_DIR            merged model, evals/TOFU_*.json, job.yaml, logs/, server/ (state),
#                      pum_round{r}_copy{k}/ (worker logs) [saves/unlearn/$TASK_NAME]
#   PUM_SERVER_PORT    [a free port]  PUM_ADMIN_TOKEN [generated]  JOB_TIMEOUT seconds [14400]
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET=""
if (($# > 0)); then
  PRESET="$REPO_DIR/presets/tofu/$1.yaml"
  if [[ ! -f "$PRESET" ]]; then
    echo "error: no preset $PRESET; have: $(cd "$REPO_DIR/presets/tofu" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
  fi
  PUM_INNER_HANDLER="$1"
fi
# shellcheck source=scripts/tofu_common.sh
. "$REPO_DIR/scripts/tofu_common.sh"

PUM_COPIES_M="${PUM_COPIES_M:-4}"
PUM_ROUNDS_R="${PUM_ROUNDS_R:-2}"
PUM_NOISE_KAPPA="${PUM_NOISE_KAPPA:-0.01}"
PUM_ALPHA_MIN="${PUM_ALPHA_MIN:-1}"
PUM_ALPHA_MAX="${PUM_ALPHA_MAX:-2}"
PUM_JITTER_TAU="${PUM_JITTER_TAU:-0}"
PUM_LOCAL_MAX_STEPS="${PUM_LOCAL_MAX_STEPS:-}"
WORKER_THREADS="${WORKER_THREADS:-1}"
JOB_TIMEOUT="${JOB_TIMEOUT:-14400}"
TASK_NAME="${TASK_NAME:-tofu_${FORGET_SPLIT}_${PUM_INNER_HANDLER}_pum}"
OUT_DIR="${OUT_DIR:-saves/unlearn/$TASK_NAME}"
[[ "$TASK_NAME" =~ ^[A-Za-z0-9._-]{1,100}$ ]] || die "TASK_NAME must be 1-100 letters, digits, '.', '_' or '-' (got '$TASK_NAME')"

# GPUs: one worker per visible GPU, each pinned with CUDA_VISIBLE_DEVICES.
GPUS=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a GPUS <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null 2>&1; then
  n_gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  for ((i = 0; i < n_gpus; i++)); do GPUS+=("$i"); done
fi
if ((${#GPUS[@]} > 0)); then N_WORKERS="${N_WORKERS:-${#GPUS[@]}}"; else N_WORKERS="${N_WORKERS:-2}"; fi
((N_WORKERS >= 1)) || die "N_WORKERS must be ≥ 1 (got $N_WORKERS)"

mkdir -p "$OUT_DIR/logs"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [[ -d "$MODEL_DIR" ]]; then MODEL_DIR="$(cd "$MODEL_DIR" && pwd)"; fi  # absolute for the server (or a cached id)
SERVER_DIR="$OUT_DIR/server"
rm -rf "$SERVER_DIR"  # a fresh job state for every run of this script
mkdir -p "$SERVER_DIR"

# ---- server (model owner)
if [[ -z "${PUM_ADMIN_TOKEN:-}" ]]; then
  PUM_ADMIN_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))')"
fi
export PUM_ADMIN_TOKEN
PORT="${PUM_SERVER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
SERVER_URL="http://127.0.0.1:$PORT"
started=$SECONDS
log "server on $SERVER_URL (log: $OUT_DIR/logs/server.log)"
# Started as "$PYTHON" itself (not through the pum function), so that $! is the server's pid.
"$PYTHON" -m pum.cli server --host 127.0.0.1 --port "$PORT" --state-dir "$SERVER_DIR/state" \
  --saves-dir "$SERVER_DIR/saves" > "$OUT_DIR/logs/server.log" 2>&1 &
PIDS+=($!)
SERVER_PID=$!
"$PYTHON" - "$SERVER_URL" "$SERVER_PID" << 'EOF' || die "the server did not start; see $OUT_DIR/logs/server.log"
import os, sys, time
import httpx
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(1)
    try:
        if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
            sys.exit(0)
    except httpx.TransportError:
        pass
    time.sleep(0.3)
sys.exit(1)
EOF
admin() { pum --log-level WARNING admin --server "$SERVER_URL" "$@"; }
json_field() { "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# ---- the job: a preset with overrides, or from the environment
JOB_FILE="$OUT_DIR/job.yaml"
CREATE_ARGS=("$JOB_FILE")
if [[ -n "$PRESET" ]]; then
  cp "$PRESET" "$JOB_FILE"  # the job is the preset, with the overrides below (logged)
  CREATE_ARGS+=(--set "model_dir=$MODEL_DIR" --set "task=$TASK_NAME")
  if [[ -n "${BASE_MODEL_DIR:-}" && -z "${PUM_BASE_MODEL:-}" ]]; then  # κ relative to θ − θ_base
    CREATE_ARGS+=(--set "pum.base_model=$(cd "$BASE_MODEL_DIR" && pwd)")
  fi
  if [[ "$CPU_MODELS" == 1 ]]; then  # tiny CPU models need a larger learning rate than TOFU's 1e-5 (CPU-NOTES.md)
    CREATE_ARGS+=(--set "hyperparams.learning_rate=$LR" --set "hyperparams.num_train_epochs=$PUM_LOCAL_EPOCHS")
  fi
  while IFS= read -r pair; do CREATE_ARGS+=(--set "hyperparams.$pair"); done < <("$PYTHON" -c '
import json, sys
for key, value in json.loads(sys.argv[1] or "{}").items():
    print(f"{key}={json.dumps(value)}")
' "$HYPERPARAMS")
  log "job from preset $PRESET: ${CREATE_ARGS[*]:1}"
else
  # Values travel as arguments, never pasted into code; YAML typed by yaml.safe_dump (1e-4 stays a number).
  # A noise scale other than κ in the environment (PUM_SIGMA, ...) replaces noise_kappa.
  "$PYTHON" - "$JOB_FILE" "$TASK_NAME" "$MODEL_DIR" "$PUM_COPIES_M" "$PUM_ROUNDS_R" "$PUM_NOISE_KAPPA" \
    "$PUM_ALPHA_MIN" "$PUM_ALPHA_MAX" "$PUM_JITTER_TAU" "$PUM_INNER_HANDLER" "$PUM_LOCAL_EPOCHS" \
    "$PUM_LOCAL_MAX_STEPS" "$TRAIN_HYPERPARAMS" "${BASE_MODEL_DIR:-}" << 'EOF'
import json, os, sys
import yaml
path, task, model_dir, m, rounds, kappa, a_min, a_max, tau, method, epochs, max_steps, hyper, base = sys.argv[1:]
pum = {"copies_m": int(m), "rounds_R": int(rounds), "alpha_min": float(a_min), "alpha_max": float(a_max),
       "jitter_tau": float(tau), "inner_handler": method, "local_epochs": float(epochs)}
if not any(os.environ.get(name) for name in ("PUM_SIGMA", "PUM_SIGMA_PER_LAYER", "DP_EPSILON")):
    pum["noise_kappa"] = float(kappa)
if max_steps:
    pum["local_max_steps"] = int(max_steps)
if base and not os.environ.get("PUM_BASE_MODEL"):
    pum["base_model"] = os.path.abspath(base)
job = {"task": task, "model_dir": model_dir, "pum": pum, "hyperparams": json.loads(hyper)}
with open(path, "w") as f:
    yaml.safe_dump(job, f, sort_keys=False)
EOF
  log "job file $JOB_FILE: $PUM_INNER_HANDLER, m=$PUM_COPIES_M, R=$PUM_ROUNDS_R, κ=$PUM_NOISE_KAPPA, $PUM_LOCAL_EPOCHS epochs"
fi
JOB_ID="$(admin create "${CREATE_ARGS[@]}" | json_field id)"
log "created $JOB_ID"

# ---- workers (data owner): one token each, CUDA_VISIBLE_DEVICES per worker when there are GPUs
WORKER_PIDS=()
for ((i = 0; i < N_WORKERS; i++)); do
  token="$(admin token "$JOB_ID" --label "worker$i" | json_field token)"
  worker_env=(PUM_WORKER_TOKEN="$token" OMP_NUM_THREADS="$WORKER_THREADS")
  worker_args=(--server "$SERVER_URL" --forget "$DATA_DIR/$FORGET_SPLIT.json" --retain "$DATA_DIR/$RETAIN_SPLIT.json"
    --saves-dir "$(dirname "$OUT_DIR")" --no-progress)
  if ((${#GPUS[@]} > 0)); then
    worker_env+=(CUDA_VISIBLE_DEVICES="${GPUS[i % ${#GPUS[@]}]}")
    where="GPU ${GPUS[i % ${#GPUS[@]}]}"
  else
    worker_args+=(--device cpu --threads "$WORKER_THREADS")
    where="CPU"
  fi
  env "${worker_env[@]}" "$PYTHON" -m pum.cli worker "${worker_args[@]}" > "$OUT_DIR/logs/worker$i.log" 2>&1 &
  PIDS+=($!)
  WORKER_PIDS+=($!)
  log "worker $i on $where (log: $OUT_DIR/logs/worker$i.log)"
done

admin start "$JOB_ID" > /dev/null
log "started $JOB_ID; waiting (at most $JOB_TIMEOUT s)"
# `pum admin wait` in the background, watched: a job whose workers have all exited never ends.
"$PYTHON" -m pum.cli --log-level WARNING admin --server "$SERVER_URL" wait "$JOB_ID" --timeout "$JOB_TIMEOUT" \
  > "$OUT_DIR/logs/job_status.json" &
WAIT_PID=$!
PIDS+=("$WAIT_PID")
while kill -0 "$WAIT_PID" 2> /dev/null; do
  alive=0
  for pid in "${WORKER_PIDS[@]}"; do
    if kill -0 "$pid" 2> /dev/null; then alive=1; fi
  done
  if ((alive == 0)); then
    sleep 15  # workers also exit when the job is finalized: give the wait time to see it
    if kill -0 "$WAIT_PID" 2> /dev/null; then die "every worker exited before $JOB_ID finished; see $OUT_DIR/logs/worker*.log"; fi
  fi
  sleep 2
done
wait "$WAIT_PID" || true  # exit status 4: the job failed or was aborted; its state is read next
STATE="$(json_field state < "$OUT_DIR/logs/job_status.json")"
[[ "$STATE" == finalized ]] || die "job $JOB_ID ended $STATE; see $OUT_DIR/logs/ and $OUT_DIR/logs/job_status.json"
fg_run "$PYTHON" -m pum.cli --log-level WARNING admin --server "$SERVER_URL" download "$JOB_ID" "$OUT_DIR" > /dev/null
log "merged model in $OUT_DIR ($((SECONDS - started)) s)"

run_eval "$OUT_DIR"
log "done in $((SECONDS - started)) s: $OUT_DIR/evals/TOFU_SUMMARY.json"
