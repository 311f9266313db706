# syntax=docker/dockerfile:1
#
# huginn container images (BuildKit, the default builder since Docker 23).
#
#   CPU (the default target, the last stage of this file):
#     docker build -t huginn:cpu .
#   CUDA (NVIDIA GPUs; CUDA_COMPUTE_CAP is the GPU generation the kernels are compiled for:
#   80 A100, 86 A10/RTX 30xx, 89 L4/L40S, 90 H100/H200):
#     docker build --target cuda --build-arg CUDA_COMPUTE_CAP=90 -t huginn:cuda .
#
# Both images run `huginn serve` as user 10001 in /app, listening on 0.0.0.0:8000, with the
# default model (models/huginn-addition) baked in. Settings come from /app/config/default.toml
# (mount a file or a ConfigMap there to replace it) and from HUGINN_<SECTION>_<KEY> variables,
# which take precedence over the file (e.g. HUGINN_MODEL_PATH=/models/huginn-0125,
# HUGINN_MODEL_DEVICES=cuda:0,cuda:1, HUGINN_SERVER_SHUTDOWN_GRACE_SECONDS=30).
# See deploy/README.md for Kubernetes.

# ---------------------------------------------------------------------------------------------
# Rust toolchain (also copied into the CUDA builder, so both images build with the same compiler).
FROM rust:1.95-slim-bookworm AS rust

# ---------------------------------------------------------------------------------------------
# CPU build.
FROM rust AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target folders are build caches; the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=huginn-target-cpu \
    cargo build --release --locked \
    && cp target/release/huginn /usr/local/bin/huginn

# ---------------------------------------------------------------------------------------------
# CUDA build: the CUDA 13.0 compiler and libraries from the same pinned PyPI wheels as CI
# (scripts/cuda-toolchain.sh), so the image runs exactly what CI builds.
FROM rust AS cuda-builder
# No GPU is visible during `docker build`, so the kernels' target architecture must be given.
ARG CUDA_COMPUTE_CAP=90
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's package versions move with its security updates: the base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/cuda-toolchain.sh ./scripts/cuda-toolchain.sh
RUN bash scripts/cuda-toolchain.sh /opt/cuda-wheels > /opt/cuda-env.sh \
    && mkdir -p /opt/cuda-lib \
    && cp -L /opt/cuda-wheels/venv/lib/python3*/site-packages/nvidia/cu13/lib/lib{cublas,cublasLt,curand,cudart,nvrtc}.so.* /opt/cuda-lib/
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=huginn-target-cuda \
    source /opt/cuda-env.sh \
    && export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    && cargo build --release --locked --features cuda \
    && cp target/release/huginn /usr/local/bin/huginn

# ---------------------------------------------------------------------------------------------
# CUDA runtime: `docker build --target cuda`. Needs an NVIDIA driver for CUDA 13.0 (R580 or later)
# and the NVIDIA container toolkit on the host (`docker run --gpus all ...`; on Kubernetes the
# NVIDIA device plugin), which provides libcuda; the CUDA libraries come from the builder's wheels.
FROM debian:bookworm-slim AS cuda
RUN groupadd --system --gid 10001 huginn \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin huginn
WORKDIR /app
COPY --from=cuda-builder /usr/local/bin/huginn /usr/local/bin/huginn
COPY --from=cuda-builder /opt/cuda-lib /opt/cuda/lib
COPY config/default.toml /app/config/default.toml
COPY models/huginn-addition /app/models/huginn-addition
COPY models/huginn-addition-6 /app/models/huginn-addition-6
# One worker per visible GPU.
ENV HUGINN_SERVER_HOST=0.0.0.0 \
    HUGINN_SERVER_PORT=8000 \
    HUGINN_MODEL_DEVICES=cuda:all \
    LD_LIBRARY_PATH=/opt/cuda/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8000
# The image has no HTTP client: bash's /dev/tcp sends the request (liveness: GET /health).
# Real checkpoints take minutes to load onto the GPU: a longer start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${HUGINN_SERVER_PORT} && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/huginn"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CPU runtime, the default target: `docker build .`
FROM debian:bookworm-slim AS cpu
RUN groupadd --system --gid 10001 huginn \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin huginn
WORKDIR /app
COPY --from=builder /usr/local/bin/huginn /usr/local/bin/huginn
COPY config/default.toml /app/config/default.toml
COPY models/huginn-addition /app/models/huginn-addition
COPY models/huginn-addition-6 /app/models/huginn-addition-6
ENV HUGINN_SERVER_HOST=0.0.0.0 \
    HUGINN_SERVER_PORT=8000
USER 10001:10001
EXPOSE 8000
# The image has no HTTP client: bash's /dev/tcp sends the request (liveness: GET /health).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${HUGINN_SERVER_PORT} && printf 'GET /health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/huginn"]
CMD ["serve"]
