# syntax=docker/dockerfile:1
# ditmesh, CPU image: the gateway and the helm test pod (and every stage when the chart
# runs with gpu.enabled=false). `ditmesh serve gateway` reads each model's configuration
# as the stages do, so this image carries the server extra with a CPU build of torch.
# Build from the repository root: docker build -f docker/cpu.Dockerfile -t ditmesh-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ditmesh
WORKDIR /src
COPY docker/constraints.txt docker/constraints.txt
# torch first from its CPU index, so the extras below find it satisfied (no CUDA wheels).
RUN /opt/ditmesh/bin/pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY services services
COPY gateway gateway
COPY client client
COPY protos protos
RUN /opt/ditmesh/bin/pip install -c docker/constraints.txt ".[server,vae,k8s,telemetry]" \
 && /opt/ditmesh/bin/python -c "import ditmesh.cli, ditmesh.gateway.main, torch; print(torch.__version__)"

# The final image: the venv alone on a clean base, no compiler, no pip cache, no sources.
FROM ${PYTHON_IMAGE}
COPY --from=build /opt/ditmesh /opt/ditmesh
RUN groupadd --gid 10001 ditmesh \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ditmesh \
 && mkdir -p /models /cache && chown 10001:10001 /cache
ENV PATH=/opt/ditmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface
# Models come from a mounted volume (/models) or, given a hub id, into the HF cache (/cache).
VOLUME ["/cache"]
USER 10001:10001
EXPOSE 50051 9400 8000
ENTRYPOINT ["ditmesh"]
CMD ["--help"]
