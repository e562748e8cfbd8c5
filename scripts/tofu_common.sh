# Shared by scripts/tofu_unlearn.sh and scripts/tofu_pum.sh (sourced, not run): the environment
# knobs both read, the CPU models when no MODEL_DIR is given, and the evaluation step.
# Expects REPO_DIR; defines pum, log, die, fg_run, run_eval, the cleanup trap and the variables
# listed in the two scripts.

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# Processes this script started; the EXIT trap ends them (by pid), whatever ends the script.
PIDS=()
cleanup() {
  local status=$?
  trap - EXIT
  for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2> /dev/null || true; done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# fg_run CMD...: run CMD (an executable, not a shell function: $! must be its pid) and wait for it.
# Bash runs a trap only after a foreground command returns; `wait` returns at once on a signal,
# so a TERM or Ctrl-C cleans up at once rather than after an hour-long job.
fg_run() {
  "$@" &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid"
}

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi
pum() { "$PYTHON" -m pum.cli "$@"; }
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [[ -n "${THREADS:-}" ]]; then export OMP_NUM_THREADS="$THREADS"; fi

DATA_DIR="${DATA_DIR:-${PUM_TOFU_DATA:-$REPO_DIR/../shared/data/tofu}}"
FORGET_SPLIT="${FORGET_SPLIT:-forget10}"
case "$FORGET_SPLIT" in
  forget01) RETAIN_SPLIT=retain99 ;;
  forget05) RETAIN_SPLIT=retain95 ;;
  forget10) RETAIN_SPLIT=retain90 ;;
  *) die "FORGET_SPLIT must be forget01, forget05 or forget10 (got '$FORGET_SPLIT')" ;;
esac
[[ -f "$DATA_DIR/$FORGET_SPLIT.json" ]] || die "no $DATA_DIR/$FORGET_SPLIT.json: set DATA_DIR (or PUM_TOFU_DATA) to the TOFU folder"
PUM_INNER_HANDLER="${PUM_INNER_HANDLER:-GradDiff}"
PUM_CPU_SPEC="${PUM_CPU_SPEC:-default}"
PUM_TOFU_CPU_CACHE="${PUM_TOFU_CPU_CACHE:-$REPO_DIR/.cache/tofu-cpu}"

if [[ -z "${MODEL_DIR:-}" ]]; then
  [[ -z "${RETAIN_MODEL_DIR:-}" ]] || die "RETAIN_MODEL_DIR is set but MODEL_DIR is not: give both, or neither (CPU models)"
  log "no MODEL_DIR: using the CPU models ($PUM_CPU_SPEC spec; built once, cached in $PUM_TOFU_CPU_CACHE)"
  assignments="$("$PYTHON" "$REPO_DIR/bench/tofu_bench.py" --print-models --spec "$PUM_CPU_SPEC" \
    --forget-split "$FORGET_SPLIT" --data "$DATA_DIR" --cache-dir "$PUM_TOFU_CPU_CACHE" --log-level WARNING)"
  eval "$assignments"  # MODEL_DIR=… RETAIN_MODEL_DIR=… BASE_MODEL_DIR=… (shell-quoted by the script)
  CPU_MODELS=1
else
  CPU_MODELS=0
  [[ -n "${RETAIN_MODEL_DIR:-}" ]] || log "warning: no RETAIN_MODEL_DIR: forget quality will not be computed"
fi
if [[ "$CPU_MODELS" == 1 ]]; then
  PUM_LOCAL_EPOCHS="${PUM_LOCAL_EPOCHS:-5}"; LR="${LR:-1e-4}"; MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"
else
  PUM_LOCAL_EPOCHS="${PUM_LOCAL_EPOCHS:-10}"; LR="${LR:-1e-5}"; MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-200}"
fi
BATCH_SIZE="${BATCH_SIZE:-32}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.01}"
SEED="${SEED:-0}"
HYPERPARAMS="${HYPERPARAMS:-}"
EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-32}"

# The trainer's hyperparameters as JSON (numbers typed here, not left to YAML's guesswork).
TRAIN_HYPERPARAMS="$("$PYTHON" -c '
import json, sys
lr, batch, wd, seed, extra = sys.argv[1:]
h = {"lr": float(lr), "batch_size": int(batch), "weight_decay": float(wd), "seed": int(seed)}
more = json.loads(extra or "{}")
if not isinstance(more, dict):
    sys.exit("HYPERPARAMS must be a JSON object")
h.update(more)
print(json.dumps(h))
' "$LR" "$BATCH_SIZE" "$WEIGHT_DECAY" "$SEED" "$HYPERPARAMS")"

# run_eval DIR: TOFU metrics of the model in DIR, written to DIR/evals/TOFU_SUMMARY.json (open-unlearning's place).
run_eval() {
  local eval_args=("$1" --data "$DATA_DIR" --forget-split "$FORGET_SPLIT" --max-new-tokens "$MAX_NEW_TOKENS"
    --batch-size "$EVAL_BATCH_SIZE" --no-progress)
  [[ -n "${RETAIN_MODEL_DIR:-}" ]] && eval_args+=(--retain-model "$RETAIN_MODEL_DIR")
  [[ -n "${RETAIN_EVAL_DIR:-}" ]] && eval_args+=(--retain-out "$RETAIN_EVAL_DIR")
  [[ -n "${MAX_ITEMS:-}" ]] && eval_args+=(--max-items "$MAX_ITEMS")
  [[ -n "${DEVICE:-}" ]] && eval_args+=(--device "$DEVICE")
  log "evaluating $1 on $FORGET_SPLIT (max $MAX_NEW_TOKENS new tokens)"
  fg_run "$PYTHON" -m pum.cli eval "${eval_args[@]}"
}
