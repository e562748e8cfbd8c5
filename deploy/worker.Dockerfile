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
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# Numeric id of the unprivileged user: the same default as the server image (see there).
ARG PUM_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/pum/.cache/huggingface

# The project, without touching the base image's CUDA build of torch: the constraint pins torch
# to the version already installed, so the resolver can neither upgrade it nor swap in a CPU
# wheel (it picks versions of the other dependencies that fit it instead).
COPY pyproject.toml README.md /tmp/pum-src/
COPY cli /tmp/pum-src/cli
COPY common /tmp/pum-src/common
COPY server /tmp/pum-src/server
COPY client /tmp/pum-src/client
COPY demo /tmp/pum-src/demo
COPY evaluation /tmp/pum-src/evaluation
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt /tmp/pum-src \
    && python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'torch in the worker image lost its CUDA build')" \
    && rm -rf /tmp/pum-src /tmp/torch-constraint.txt

RUN groupadd --non-unique --gid "${PUM_UID}" pum \
    && useradd --non-unique --uid "${PUM_UID}" --gid pum --create-home --no-log-init --shell /usr/sbin/nologin pum \
    && mkdir -p /saves \
    && chown -R pum:pum /saves
USER pum
WORKDIR /home/pum

ENTRYPOINT ["pum", "worker"]
