# ESMC gRPC service on an NVIDIA GPU (falls back to the CPU when none is visible).
#   docker build -t esmc-serve .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 esmc-serve
# Settings: flags after the image name (e.g. --model esmc-300m) or ESMC_* environment variables.
#
# Build arguments:
#   BASE_IMAGE       a CUDA runtime image (Debian or Ubuntu, apt, no Python needed)
#   TORCH_INDEX_URL  where the CUDA build of torch comes from (and its dependencies)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST  the index for everything else
#     (a mirror); or PIP_CONFIG_FILE, a pip.conf the build mounts (a proxy's CA, say).
#     Read by pip during the build only, never stored in the image.
# Layers of the final image: base, Python and the user, dependencies, the project.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# --- dependencies: a virtual environment with torch and the project's requirements ----------
FROM ${BASE_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CONFIG_FILE
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# torch first, from the CUDA index, so that the project's `torch>=` range is already met.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# The requirements of `.[server]`, read from pyproject.toml alone: this layer is rebuilt
# only when they change, not when the source does.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# --- the project, built as a wheel (its build tools stay in this stage) ------------------------
FROM deps AS wheel
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CONFIG_FILE
COPY pyproject.toml README.md /src/
COPY esmc /src/esmc
COPY server /src/server
COPY client /src/client
COPY protos /src/protos
RUN pip wheel --no-deps --wheel-dir /wheels /src

# --- the image: base + Python and user + the dependencies' venv + the project -----------------
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# The interpreter only (the venv's pip came with the venv); no apt lists or caches left.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && useradd --create-home --no-log-init --uid 10001 esmc
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps --no-index /wheels/esmc_serve-*.whl
# Non-root user; downloaded weights go to its Hugging Face cache (mount a volume there to keep them).
USER esmc
ENV HF_HOME=/home/esmc/.cache/huggingface

# 50051: gRPC (ESMC, grpc.health.v1, reflection); 9090: Prometheus metrics.
EXPOSE 50051 9090

# Healthy once the server reports SERVING (model loaded and warmed up).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; stub = rpc.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); sys.exit(stub.Check(pb.HealthCheckRequest(), timeout=3).status != pb.HealthCheckResponse.SERVING)"]

# SIGTERM (docker stop) turns health NOT_SERVING and drains requests in flight.
STOPSIGNAL SIGTERM
ENTRYPOINT ["esmc", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
