# syntax=docker/dockerfile:1
# ditmesh, CUDA image: the encoder, denoiser and VAE stages on NVIDIA GPUs. The torch
# wheel carries its CUDA runtime, cuDNN and NCCL (the nvidia-* wheels it pins), so the
# base is plain Python; the driver comes from the node (NVIDIA container toolkit).
# torchrun (multi-node gangs, the chart's LeaderWorkerSet) comes with torch.
# Build from the repository root: docker build -f docker/cuda.Dockerfile -t ditmesh-cuda:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ditmesh
WORKDIR /src
COPY docker/constraints.txt docker/constraints.txt
RUN /opt/ditmesh/bin/pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY services services
COPY gateway gateway
COPY client client
COPY protos protos
RUN /opt/ditmesh/bin/pip install -c docker/constraints.txt ".[server,vae,k8s,telemetry]" \
 && /opt/ditmesh/bin/python -c "import ditmesh.cli, ditmesh.denoiser.service, torch; print(torch.__version__, torch.version.cuda)"

# The final image: the venv alone on a clean base, no pip cache, no sources. One exception
# to "no build tools": Triton (behind `--compile`) builds its small CUDA launcher with the
# system C compiler the first time it runs, so gcc and libc headers stay; nothing else.
FROM ${PYTHON_IMAGE}
COPY --from=build /opt/ditmesh /opt/ditmesh
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 ditmesh \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ditmesh \
 && mkdir -p /models /cache && chown 10001:10001 /cache
ENV PATH=/opt/ditmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 50051 9400 29500
ENTRYPOINT ["ditmesh"]
CMD ["--help"]
