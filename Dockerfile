# ESMC gRPC service on an NVIDIA GPU (falls back to the CPU when none is visible).
#   docker build -t esmc-serve .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 esmc-serve
# Settings: flags after the image name (e.g. --model esmc-300m) or ESMC_* environment variables.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the CUDA index, so that the project's `torch>=` range is already met.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY . /app
RUN pip install ".[server]"

# Non-root user; downloaded weights go to its Hugging Face cache (mount a volume there to keep them).
RUN useradd --create-home --uid 10001 esmc
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
