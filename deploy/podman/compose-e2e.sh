#!/bin/sh
# Build the images and run docker-compose.yml with CPU workers (deploy/compose.cpu.yaml) under
# podman, end to end: server healthy -> setup creates and starts the job -> two workers train its
# copies -> the merged model lands in SAVES/unlearn/<task>/. Exit 0 only when the job is finalized
# and the merged model is there. See deploy/podman/README.md.
#
# Usage: compose-e2e.sh [WORKDIR]      (default: a new temporary folder, removed at the end)
# Environment:
#   PYTHON           the project's python, for the demo's tiny model and the torch wheels (default .venv/bin/python)
#   PUM_TORCH_INDEX  a pip index with the CPU torch wheel for the image build; default: a local index
#                    made with `pip download` from this host's pip configuration
#   PUM_E2E_KEEP=1   keep the containers, volumes and WORKDIR for a look afterwards
# Needs: podman, runc, mmdebstrap (for the stand-in base image), podman-compose (pip install -e '.[deploy]').
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/deploy/podman
python=${PYTHON:-$repo/.venv/bin/python}
export CONTAINERS_CONF="$here/containers.conf"
own_work=no
if [ -z "${1:-}" ]; then
    own_work=yes
fi
work=${1:-$(mktemp -d /tmp/pum-compose-e2e.XXXXXX)}
project=pum-e2e-$$
mkdir -p "$work"
work=$(cd "$work" && pwd)

step() { printf '\n== %s (%s s)\n' "$*" "$(( $(date +%s) - started ))"; }
started=$(date +%s)

compose() {
    (cd "$repo" && PUM_MODELS_DIR="$work/models" PUM_DATA_DIR="$work/data" PUM_SAVES_DIR="$work/saves" \
        PUM_JOB_FILE=./deploy/job.cpu.yaml PUM_PORT=${PUM_PORT:-18000} \
        "$python" -m podman_compose -p "$project" -f docker-compose.yml -f deploy/compose.cpu.yaml "$@")
}

cleanup() {
    status=$?
    if [ "${PUM_E2E_KEEP:-0}" = 1 ]; then
        echo "compose-e2e: kept project $project and $work"
    else
        compose down -v > /dev/null 2>&1 || true
        [ "$own_work" = no ] || rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT

step "stand-in base image"
sh "$here/base-image.sh"

step "torch for the image build"
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' "$repo/deploy/server.Dockerfile")
index=${PUM_TORCH_INDEX:-}
mount=""
if [ -z "$index" ] && [ ! -d "$work/torch-index/torch" ]; then
    # A PEP 503 folder index (one folder per project) of torch and its dependencies, as this host's
    # pip resolves them (its configuration finds the CPU wheel); the build reads it through a mount.
    "$python" -m pip download --quiet --only-binary=:all: -d "$work/wheels" "torch==$torch_version"
    for wheel in "$work"/wheels/*.whl; do
        file=$(basename "$wheel")
        name=$(echo "$file" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
        mkdir -p "$work/torch-index/$name"
        mv "$wheel" "$work/torch-index/$name/"
        printf '<a href="%s">%s</a>\n' "$file" "$file" >> "$work/torch-index/$name/index.html"
    done
fi
if [ -z "$index" ]; then
    index=file:///opt/torch-index
    mount="--volume=$work/torch-index:/opt/torch-index:ro"
fi

step "images"
build() {
    dockerfile=$1
    shift
    # --format docker: the OCI format has no HEALTHCHECK, and podman would drop the server's.
    # shellcheck disable=SC2086  # $mount is one optional word
    podman build --quiet --format docker --file "$repo/deploy/$dockerfile" --ignorefile "$repo/deploy/$dockerfile.dockerignore" \
        --build-arg TORCH_INDEX_URL="$index" $mount "$@" "$repo"
}
build server.Dockerfile --target torch-cpu --tag pum-torch-cpu
build server.Dockerfile --tag pum-server
build worker.Dockerfile --tag pum-worker --build-arg BASE_IMAGE=pum-torch-cpu --build-arg REQUIRE_CUDA=0

step "the demo's tiny model and data"
mkdir -p "$work/models" "$work/data" "$work/saves"
"$python" - "$work" <<'EOF'
import shutil, sys
from pathlib import Path

from pum.demo.assets import tiny_assets

work = Path(sys.argv[1])
assets = tiny_assets(work / "cache")
shutil.copytree(assets.model_dir, work / "models" / "pum-demo-tiny", dirs_exist_ok=True)
shutil.copy(assets.split("forget10"), work / "data" / "forget.json")
shutil.copy(assets.split("retain90"), work / "data" / "retain.json")
EOF
# The images' user (PUM_UID's default, 10001) reads the model and the data and writes the merged model.
chmod -R a+rX "$work/models" "$work/data"
chown -R 10001 "$work/saves"

# podman 4.3 runs no health checks by itself (no systemd timers here) and podman-compose skips the
# service_healthy condition before podman 4.6: the order that depends_on asks for is kept here,
# one step at a time, with the compose file's services, volumes, environment and commands.
step "server"
compose up -d --no-build server
server=$(podman ps --filter "label=io.podman.compose.project=$project" --filter "label=com.docker.compose.service=server" --format '{{.Names}}')
tries=0
until podman healthcheck run "$server" > /dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then
        podman logs "$server" | tail -20
        echo "compose-e2e: the server's health check did not pass in 60 s" >&2
        exit 1
    fi
    sleep 1
done

step "setup (creates and starts the job)"
compose up --no-build --no-deps setup
setup=$(podman ps -a --filter "label=io.podman.compose.project=$project" --filter "label=com.docker.compose.service=setup" --format '{{.Names}}')
[ "$(podman inspect --format '{{.State.ExitCode}}' "$setup")" = 0 ] || { echo "compose-e2e: setup failed" >&2; exit 1; }

step "workers (until the job ends)"
compose up -d --no-build --no-deps worker-0 worker-1
for service in worker-0 worker-1; do
    name=$(podman ps -a --filter "label=io.podman.compose.project=$project" --filter "label=com.docker.compose.service=$service" --format '{{.Names}}')
    code=$(podman wait "$name")
    podman logs "$name" 2>&1 | tail -3
    [ "$code" = 0 ] || { echo "compose-e2e: $service exited $code" >&2; exit 1; }
done

step "result"
job=$(podman run --rm --volume "${project}_tokens:/tokens:ro" --entrypoint cat pum-server /tokens/job-id)
podman exec "$server" pum admin status "$job" --json > "$work/status.json"
"$python" - "$work" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
status = json.loads((work / "status.json").read_text())
merged = work / "saves" / "unlearn" / "cpu_demo_graddiff"
files = sorted(p.name for p in merged.rglob("*.safetensors"))
print(f"job {status['state']}, rounds {status['round']}, merged model files: {files}")
sys.exit(0 if status["state"] == "finalized" and files else "compose-e2e: the job did not finish with a merged model")
EOF
step "done"
