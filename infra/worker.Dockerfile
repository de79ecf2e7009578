# syntax=docker/dockerfile:1.7
# The mergeflow image: library + flows + Prefect worker + MLflow server, for CPU or CUDA.
# Build from the repository root (infra/worker.Dockerfile.dockerignore keeps .venv, caches and outputs out):
#
#   docker build -f infra/worker.Dockerfile -t mergeflow-worker:cpu .
#   docker build -f infra/worker.Dockerfile --build-arg VARIANT=cuda -t mergeflow-worker:cuda .
#
# The compose stack (infra/docker-compose.yml) runs the Prefect server, the MLflow server and the workers from it,
# so every service uses the versions pinned in constraints.txt (prefect 3.8.8 needs fastapi<0.151 and
# sqlalchemy<2.1, which images built elsewhere may not have).
#
# CUDA variant: torch's CUDA wheels carry their own CUDA runtime, cuDNN and NCCL (the nvidia-* packages), so the
# image needs only the host driver, which the NVIDIA container toolkit mounts in. An nvidia/cuda base would add a
# second copy of the runtime and has no Python 3.11; both variants therefore start from the same python image.
# TORCH_CUDA picks the wheel index (cu130 needs a driver >= 580; use e.g. cu128 for older drivers).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS base-cuda
ARG TORCH_CUDA=cu130
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${VARIANT} AS worker

# Offline by default, as everywhere in this project; pass --build-arg HF_HUB_OFFLINE=0 (or set it at run time) on
# the worker that resolves hub checkpoints into the shared HF cache.
ARG HF_HUB_OFFLINE=1
ARG MERGEFLOW_UID=1000
ENV MERGEFLOW_PROJECT_DIR=/opt/mergeflow \
    MERGEFLOW_HOME=/cache/mergeflow \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=${HF_HUB_OFFLINE} \
    HF_DATASETS_OFFLINE=${HF_HUB_OFFLINE} \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The volume mount points exist in the image, owned by the runtime user, so that a new named volume mounted on
# /cache (or /mlartifacts and /mlauth, the MLflow server's) starts with that ownership (Kubernetes: the pod's fsGroup
# does that).
RUN useradd --create-home --uid "${MERGEFLOW_UID}" --shell /bin/bash mergeflow \
 && mkdir -p /opt/mergeflow /cache/mergeflow /cache/huggingface /mlartifacts /mlauth \
 && chown -R mergeflow:mergeflow /opt/mergeflow /cache /mlartifacts /mlauth

WORKDIR /opt/mergeflow

# Dependencies first (their layer is reused until the library or the pins change). torch is pinned in the same pip
# command as everything else, with the variant's wheel index, so pip keeps 2.13.0+cpu / +cuXXX and never swaps in
# another build; psycopg2 is the MLflow server's Postgres driver (Prefect's, asyncpg, comes with prefect), Flask-WTF
# (with WTForms) the CSRF protection its basic-auth app (--app-name=basic-auth) refuses to start without.
COPY --chown=mergeflow:mergeflow pyproject.toml constraints.txt README.md ./
COPY --chown=mergeflow:mergeflow mergeflow/ mergeflow/
RUN --mount=type=cache,target=/var/cache/pip \
    PIP_CACHE_DIR=/var/cache/pip pip install -c constraints.txt --extra-index-url "${TORCH_INDEX_URL}" \
        torch==2.13.0 ".[all]" psycopg2-binary==2.9.13 flask-wtf==1.3.0 wtforms==3.3.2 \
 && python -c "import torch, mergeflow, prefect, mlflow, lm_eval; print('torch', torch.__version__)"

# The flows, tasks and recipes the deployments point at (prefect.yaml's pull step: MERGEFLOW_PROJECT_DIR).
COPY --chown=mergeflow:mergeflow . .

USER mergeflow
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
