# shardserve image: the package in a venv, the default model baked in, a non-root user.
#
#   docker build -t shardserve .                                  # CPU, default model included
#   docker build --build-arg FETCH_MODEL=0 -t shardserve .        # no model: mount one at /models
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t shardserve:cuda .
#
# No Docker engine runs on the development machines: this file is checked by hadolint and by
# tests/deploy/test_deploy.py, never built there. Keep it plain enough that reading it is a real check.

# Any Debian/Ubuntu image with Python >= 3.10 works; images without Python (the CUDA runtime
# images) get the distribution's python3 below.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/sh", "-eu", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi


FROM base AS build
# The C++ kernels (app/kernels/csrc) compile here; the runtime stage needs no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION=2.13.0
# The CPU index keeps pip from pulling the multi-GB CUDA build; a CUDA image passes its own index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and alone, from its own index: the package's "torch>=2.5" is then already met
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY app ./app
# --no-build-isolation: the kernels compile against the torch installed above (an isolated build
# would fetch another torch); setup.py never targets the build machine's CPU (each file names its ISA).
RUN pip install --no-cache-dir setuptools==84.2.1 wheel==0.45.1 \
    && pip install --no-cache-dir --no-build-isolation . \
    && python -c "from app.kernels import extension; assert extension() is not None, 'kernels not built'"


FROM build AS model
ARG FETCH_MODEL=1
ENV SHARDSERVE_HOME=/models
# `shardserve download` fetches through pip, which only this stage has network-wise at build time;
# the runtime stage copies the verified file. FETCH_MODEL=0 leaves /models empty (mount a volume).
RUN mkdir -p /models \
    && if [ "${FETCH_MODEL}" = "1" ]; then shardserve download; fi


FROM base AS runtime
ARG UID=10001
# A numeric UID lets Kubernetes' runAsNonRoot verify the user without reading /etc/passwd.
RUN groupadd --system --gid "${UID}" shardserve \
    && useradd --system --uid "${UID}" --gid shardserve --create-home --home-dir /home/shardserve \
        --shell /usr/sbin/nologin shardserve
COPY --from=build /opt/venv /opt/venv
COPY --from=model --chown=shardserve:shardserve /models /models
ENV PATH=/opt/venv/bin:$PATH \
    SHARDSERVE_HOME=/models \
    SHARDSERVE_PORT=8000
USER ${UID}:${UID}
WORKDIR /home/shardserve
EXPOSE 8000
# /health is liveness (503 once the pool gave up); slim images have no curl, Python is there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SHARDSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["shardserve"]
CMD ["serve", "--host", "0.0.0.0"]
