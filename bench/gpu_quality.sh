#!/usr/bin/env bash
# TOFU quality on one GPU (issue 10, part 4): ~30 M-parameter base / target / retain90 models built on
# the GPU from the TOFU data (GPU_SPEC of pum.evaluation.cpu_models: 512 wide, 6 blocks, 8 k vocabulary),
# then NPO, GradDiff and UNDIAL as baseline and through PUM (m = 4, their rounds) at κ = 0 and κ = 0.1
# relative to the task vector θ − θ_base, evaluated with 200-token greedy generation. Sized for < 10 min
# on one H200; --max-hours stops starting runs at MAX_MINUTES, in priority order (baselines and κ = 0 first).
#
#   bench/gpu_quality.sh --prepare   # HERE (with pip and a package registry): wheels the GPU image lacks
#                                    # into .whl/, the TOFU data into .tofu/ (both in .gitignore)
#   bench/gpu_quality.sh             # THERE, e.g. run(command="bash bench/gpu_quality.sh", carry=[".whl", ".tofu"],
#                                    # timeout_s=600): results in saves/bench/gpu_quality and in $OUT when set
#   GPU_QUALITY_TINY=1 DATA_DIR=… bench/gpu_quality.sh   # the same pipeline on the CPU with the test spec
#                                    # and a few records: a check of everything but the GPU (tests/bench);
#                                    # GPU_QUALITY_SHIM=1 imports pum through the link folder, as on the GPU
#
# Knobs (environment): PYTHON [python3, or the repo's .venv], DATA_DIR [.tofu, else ../shared/data/tofu],
# OUT_DIR [saves/bench/gpu_quality], MAX_MINUTES [7], METHODS ["NPO GradDiff UNDIAL"], LR [5e-5], EPOCHS [5].
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
log() { printf '[gpu_quality %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi
# Packages the GPU image (KINDS.md: Python 3.12 with torch, transformers, safetensors, tokenizers, httpx, anyio,
# scipy, pyyaml, numpy, tqdm, absl-py, six, click, joblib, regex) lacks, at the versions this repo is tested with.
WHEELS=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5
  typing-extensions==4.16.0 opentelemetry-api==1.45.2 nltk==3.10.4 defusedxml==0.7.1)
SDISTS=(rouge-score==0.1.2)  # published as a source archive only: built into a wheel here (pure Python)

if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf .whl && mkdir -p .whl
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || die "pip download failed (a package registry is needed here)"
  "$PYTHON" -m pip wheel --quiet --no-deps -w .whl "${SDISTS[@]}" || die "building the ${SDISTS[*]} wheel failed"
  src="${DATA_DIR:-$REPO_DIR/../shared/data/tofu}"
  [[ -f "$src/forget10.json" ]] || die "no TOFU data in $src: set DATA_DIR"
  rm -rf .tofu && mkdir -p .tofu && cp "$src"/*.json "$src"/*.jsonl .tofu/ 2> /dev/null || cp "$src"/*.json .tofu/
  log "prepared: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)), TOFU data in .tofu/ ($(du -sh .tofu | cut -f1))"
  exit 0
fi

TINY="${GPU_QUALITY_TINY:-}"
started=$SECONDS
# ---- environment: the pum package (a folder of links when it is not installed), then the carried wheels
# for whatever the image cannot import
if [[ -n "${GPU_QUALITY_SHIM:-}" ]] || ! "$PYTHON" -c 'import pum.client.trainer' 2> /dev/null; then
  # pyproject maps pum.<part> to <part>/: a folder of links gives the same import names without installing.
  shim="$(mktemp -d)/shim"
  mkdir -p "$shim/pum"
  for part in cli common server client demo evaluation; do ln -s "$REPO_DIR/$part" "$shim/pum/$part"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
missing() {
  "$PYTHON" - << 'EOF'
import importlib
missing = []
for name in ("torch", "transformers", "tokenizers", "safetensors", "fastapi", "pydantic_settings", "httpx", "yaml",
             "scipy", "numpy", "rouge_score", "nltk", "tqdm", "pum.client.trainer", "pum.server.app", "pum.evaluation.tofu"):
    try:
        importlib.import_module(name)
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(missing))
EOF
}
gaps="$(missing)"
if [[ -n "$gaps" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  log "installing the carried wheels (missing: ${gaps:0:200})"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pum-site .whl/*.whl \
    || die "installing the carried wheels failed"
  export PYTHONPATH="/tmp/pum-site${PYTHONPATH:+:$PYTHONPATH}"
  gaps="$(missing)"
fi
[[ -z "$gaps" ]] || die "cannot import: $gaps. Run 'bench/gpu_quality.sh --prepare' where pip works and carry .whl"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log "pum from $("$PYTHON" -c 'import os, pum.client.trainer as t; print(os.path.dirname(os.path.dirname(t.__file__)))')"

if [[ -z "${DATA_DIR:-}" ]]; then
  if [[ -f "$REPO_DIR/.tofu/forget10.json" ]]; then DATA_DIR="$REPO_DIR/.tofu"; else DATA_DIR="$REPO_DIR/../shared/data/tofu"; fi
fi
OUT_DIR="${OUT_DIR:-$REPO_DIR/saves/bench/gpu_quality}"
METHODS="${METHODS:-NPO GradDiff UNDIAL}"
read -r -a methods <<< "$METHODS"
mkdir -p "$OUT_DIR"

if [[ -n "$TINY" ]]; then
  split=forget01
  [[ -f "$DATA_DIR/$split.json" ]] || die "no $DATA_DIR/$split.json: set DATA_DIR"
  args=(--spec test --device cpu --threads 1 --max-items 4 --max-new-tokens 4 --eval-batch-size 8 --copies 2
    --lr "${LR:-1e-3}" --epochs "${EPOCHS:-2}" --cache-dir "$OUT_DIR/cache")
else
  split=forget10
  [[ -f "$DATA_DIR/$split.json" ]] || die "no $DATA_DIR/$split.json: carry .tofu (bench/gpu_quality.sh --prepare) or set DATA_DIR"
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || die "no CUDA device visible to torch"
  nvidia-smi -L >&2 || true
  args=(--spec gpu --device cuda --threads 8 --max-new-tokens 200 --eval-batch-size 256 --copies 4
    --lr "${LR:-5e-5}" --epochs "${EPOCHS:-5}" --cache-dir "$OUT_DIR/cache")
fi
log "data $DATA_DIR, split $split, methods ${methods[*]}, out $OUT_DIR"
status=0
"$PYTHON" "$REPO_DIR/bench/tofu_bench.py" "${args[@]}" --data "$DATA_DIR" --splits "$split" \
  --methods "${methods[@]}" --seeds 0 --kappas 0 0.1 --max-hours "$(awk "BEGIN {print ${MAX_MINUTES:-7} / 60}")" \
  --out "$OUT_DIR" || status=$?
log "finished with status $status in $((SECONDS - started)) s"
if [[ -n "${OUT:-}" ]]; then  # the device tool brings back what is under $OUT
  for f in report.md results.json quality.png; do [[ -f "$OUT_DIR/$f" ]] && cp "$OUT_DIR/$f" "$OUT/gpu_quality_$f"; done
fi
[[ -f "$OUT_DIR/report.md" ]] && sed -n '1,60p' "$OUT_DIR/report.md"
exit "$status"
