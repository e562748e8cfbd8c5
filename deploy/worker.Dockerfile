# syntax=docker/dockerfile:1
# PUM worker (data owner): leases a perturbed copy, runs the inner unlearning method on its GPU
# with the local forget/retain data, and uploads the update. The data never leaves this container.
#
#   docker build -f deploy/worker.Dockerfile -t pum-worker .
#   docker run --gpus '"device=0"' -e PUM_WORKER_TOKEN=... -v "$PWD/data:/data:ro" pum-worker \
#       --server https://pum.example.org:8000 --ca-file /data/ca.crt \
#       --forget /data/forget.json --retain /data/retain.json
#
# The build context is the repository root; deploy/worker.Dockerfile.dockerignore keeps it
# to the files below.
#
# BASE_IMAGE is any image with python and torch; its torch must satisfy pyproject.toml's range,
# whose floor is the one transformers itself needs (below it transformers turns PyTorch off and
# every copy fails to load: tests/deploy/test_dependencies.py checks this default). CPU workers
# (docker-compose with deploy/compose.cpu.yaml) use the server image's torch stage and
# REQUIRE_CUDA=0:
#   docker build -f deploy/server.Dockerfile --target torch-cpu -t pum-torch-cpu .
#   docker build -f deploy/worker.Dockerfile --build-arg BASE_IMAGE=pum-torch-cpu --build-arg REQUIRE_CUDA=0 -t pum-worker .
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Numeric id of the unprivileged user: the same default as the server image (see there).
ARG PUM_UID=10001
# 1: the build fails unless the base's torch is a CUDA build (a GPU worker image).
ARG REQUIRE_CUDA=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/pum/.cache/huggingface

# The project, without touching the base image's build of torch: the constraint pins torch to
# the version already installed, so the resolver can neither upgrade it nor swap a CUDA build for
# a CPU wheel (it picks versions of the other dependencies that fit it instead, and fails here if
# pyproject.toml's torch range excludes it). The checks after it are what a copy needs at run time:
# transformers must see torch (it switches PyTorch off below its minimum rather than failing).
COPY pyproject.toml README.md /tmp/pum-src/
COPY cli /tmp/pum-src/cli
COPY common /tmp/pum-src/common
COPY server /tmp/pum-src/server
COPY client /tmp/pum-src/client
COPY demo /tmp/pum-src/demo
COPY evaluation /tmp/pum-src/evaluation
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt /tmp/pum-src \
    && python -c "import sys, transformers.utils as u; sys.exit(0 if u.is_torch_available() else 'transformers cannot use this torch')" \
    && if [ "${REQUIRE_CUDA}" = 1 ]; then \
        python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'torch in the worker image lost its CUDA build')"; \
    fi \
    && rm -rf /tmp/pum-src /tmp/torch-constraint.txt

RUN groupadd --non-unique --gid "${PUM_UID}" pum \
    && useradd --non-unique --uid "${PUM_UID}" --gid pum --create-home --no-log-init --shell /usr/sbin/nologin pum \
    && mkdir -p /saves \
    && chown -R pum:pum /saves
USER pum
WORKDIR /home/pum

ENTRYPOINT ["pum", "worker"]
