#!/usr/bin/env bash
# TOFU baseline: run an inner unlearning method directly on the target model (`pum unlearn`),
# then score it (`pum eval`: forget quality against the retain model, model utility, ...).
# The PUM counterpart with the same model, data and method is scripts/tofu_pum.sh.
#
#   scripts/tofu_unlearn.sh                                        # CPU models, forget10, GradDiff
#   PUM_INNER_HANDLER=NPO FORGET_SPLIT=forget05 scripts/tofu_unlearn.sh
#   MODEL_DIR=/models/tofu_Llama-3.2-1B_full RETAIN_MODEL_DIR=/models/tofu_Llama-3.2-1B_retain90 \
#     LR=1e-5 PUM_LOCAL_EPOCHS=10 scripts/tofu_unlearn.sh           # a real Hugging Face model (GPU)
#
# Every knob is an environment variable (defaults in brackets):
#   MODEL_DIR          target model, HF folder [the tiny CPU model trained on TOFU `full`]
#   RETAIN_MODEL_DIR   retain model, reference of forget quality [the CPU model trained on RETAIN_SPLIT;
#                      empty with MODEL_DIR given: no forget quality]
#   DATA_DIR           TOFU JSON-lines folder [$PUM_TOFU_DATA, else ../shared/data/tofu from the repo]
#   FORGET_SPLIT       forget01 | forget05 | forget10 [forget10]; RETAIN_SPLIT is derived (retain90 ...)
#   PUM_INNER_HANDLER  method: GradAscent GradDiff NPO SimNPO IdkDPO RMU UNDIAL ... [GradDiff]
#   PUM_LOCAL_EPOCHS   epochs over the forget set [5 CPU models, 10 real models]
#   LR [1e-4 CPU, 1e-5 real]  BATCH_SIZE [32]  WEIGHT_DECAY [0.01]  SEED [0]
#   HYPERPARAMS        extra trainer/method keys as JSON, e.g. '{"beta": 0.2, "warmup_steps": 2}' [{}]
#   TASK_NAME          [tofu_${FORGET_SPLIT}_${PUM_INNER_HANDLER}]
#   OUT_DIR            the unlearned model, and its evals/TOFU_SUMMARY.json [saves/unlearn/$TASK_NAME]
#   MAX_NEW_TOKENS     greedy generation budget of the evaluation [32 CPU models, 200 real models]
#   EVAL_BATCH_SIZE [32]  MAX_ITEMS (first N records per split; smoke runs) []  DEVICE [cuda if any]
#   THREADS            torch CPU threads []
#   PUM_CPU_SPEC       default | test (CPU model size) [default]; PUM_TOFU_CPU_CACHE [.cache/tofu-cpu]
#   PYTHON             [.venv/bin/python of the repo, else python3]
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/tofu_common.sh
. "$REPO_DIR/scripts/tofu_common.sh"

TASK_NAME="${TASK_NAME:-tofu_${FORGET_SPLIT}_${PUM_INNER_HANDLER}}"
OUT_DIR="${OUT_DIR:-saves/unlearn/$TASK_NAME}"

log "baseline $PUM_INNER_HANDLER on $FORGET_SPLIT: model $MODEL_DIR -> $OUT_DIR"
log "epochs $PUM_LOCAL_EPOCHS, hyperparams $TRAIN_HYPERPARAMS"
started=$SECONDS
unlearn_args=("$MODEL_DIR" --forget "$DATA_DIR/$FORGET_SPLIT.json" --retain "$DATA_DIR/$RETAIN_SPLIT.json"
  --out "$OUT_DIR" --method "$PUM_INNER_HANDLER" --epochs "$PUM_LOCAL_EPOCHS" --hyperparams "$TRAIN_HYPERPARAMS")
if [[ -n "${DEVICE:-}" ]]; then unlearn_args+=(--device "$DEVICE"); fi
if [[ -n "${THREADS:-}" ]]; then unlearn_args+=(--threads "$THREADS"); fi
fg_run "$PYTHON" -m pum.cli unlearn "${unlearn_args[@]}"
log "unlearned in $((SECONDS - started)) s"

run_eval "$OUT_DIR"
log "done in $((SECONDS - started)) s: $OUT_DIR/evals/TOFU_SUMMARY.json"
