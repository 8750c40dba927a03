# ditmesh developer commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= .demo
PROTO_FILES := $(wildcard protos/ditmesh/v1/*.proto)

.PHONY: install demo test test-fast protos check-protos lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel first, so the unpinned torch below is already satisfied.
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[server,dev,vae,k8s,telemetry]'
	touch $@

install: $(VENV)/.installed

protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
	  --grpc_python_out=protos $(PROTO_FILES)

check-protos: install
	$(PY) tools/check_protos.py

demo: install
	$(VENV)/bin/ditmesh make-tiny flux $(DEMO_DIR)/tiny-flux
	$(PY) tools/demo.py --model $(DEMO_DIR)/tiny-flux --out $(DEMO_DIR)/demo.png
	@echo "image written to $(DEMO_DIR)/demo.png"

test: install
	$(PY) -m pytest -q tests

# Unit tests only (no processes, no meshes): under a minute.
test-fast: install
	$(PY) -m pytest -q -m 'not slow' tests

lint: install
	$(VENV)/bin/ruff check services gateway client tests tools bench
	$(VENV)/bin/ruff format --check services gateway client tests tools bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
