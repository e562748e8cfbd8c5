# syntax=docker/dockerfile:1
# PUM server (model owner): CPU only. It publishes perturbed copies, merges the workers'
# updates and saves the merged model; no GPU is needed for that.
#
#   docker build -f deploy/server.Dockerfile -t pum-server .
#   docker run -p 8000:8000 -e PUM_ADMIN_TOKEN=... -v pum-state:/state -v "$PWD/saves:/saves" \
#       -v "$PWD/models:/models:ro" pum-server
#
# The build context is the repository root; deploy/server.Dockerfile.dockerignore keeps it
# to the files below (no .venv, models, state or saves).
#
# Stage torch-cpu: python and the CPU wheel of torch, first and alone (the largest layer, cached
# across code changes). It is also the base of CPU workers (deploy/worker.Dockerfile, BASE_IMAGE).
FROM python:3.11-slim AS torch-cpu

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/pum/.cache/huggingface

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

FROM torch-cpu

# Numeric id of the unprivileged user; the worker image uses the same default, so the
# worker tokens that the setup service writes (mode 600) stay readable by the workers.
ARG PUM_UID=10001

# The project: pyproject.toml, its readme, and every package folder it maps (pip install . needs them).
COPY pyproject.toml README.md /tmp/pum-src/
COPY cli /tmp/pum-src/cli
COPY common /tmp/pum-src/common
COPY server /tmp/pum-src/server
COPY client /tmp/pum-src/client
COPY demo /tmp/pum-src/demo
COPY evaluation /tmp/pum-src/evaluation
RUN pip install /tmp/pum-src && rm -rf /tmp/pum-src

COPY deploy/healthcheck.py /opt/pum/healthcheck.py

# /state, /saves and /tokens are created here, owned by the user, so that a fresh named
# volume mounted on them starts writable (Docker copies the image's ownership into it).
RUN groupadd --non-unique --gid "${PUM_UID}" pum \
    && useradd --non-unique --uid "${PUM_UID}" --gid pum --create-home --no-log-init --shell /usr/sbin/nologin pum \
    && mkdir -p /state /saves/unlearn /tokens \
    && chown -R pum:pum /state /saves /tokens
USER pum
WORKDIR /home/pum

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "/opt/pum/healthcheck.py", "http://127.0.0.1:8000/healthz"]

ENTRYPOINT ["pum"]
CMD ["server", "--host", "0.0.0.0", "--port", "8000", "--state-dir", "/state", "--saves-dir", "/saves/unlearn"]
