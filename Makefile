# edge-agent: `make test` installs everything it needs and runs lint, types and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit system-deps venv clean bench bench-quick bench-livestock run soak wheel arm64-check lock

# Rebuild every shipped model bundle from ../shared (training extra: torch CPU; ~20-40 min on 2 cores).
.PHONY: models
models: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	PYTHONPATH=models $(BIN)/python -m models.training.build_all  # the training code imports `training.*`

# Only tile_anomaly (+ its gated INT8 twin): onnxruntime + numpy, a few minutes.
.PHONY: models-tile
models-tile: $(STAMP)
	PYTHONPATH=models $(BIN)/python -m models.training.build_all --only tile

# the train extra (torch, CPU) too: tests/test_detect_fit.py fits a small detector
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	$(BIN)/python -m tests.support.wheelhouse  # the runtime dependencies as wheels, for tests/test_wheel.py
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: system-deps $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

# Cameras at 5 fps one board sustains with models/cattle_overhead (needs ../shared); see benchmarks/README.md
bench-livestock: $(STAMP)
	$(BIN)/python -m benchmarks.livestock_capacity --json benchmarks/results/livestock_capacity.json

# The wheel a user installs (pip install dist/edge_agent-*.whl): the package plus the bundles setup.py names.
wheel: $(STAMP)
	rm -rf build dist *.egg-info
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation --wheel-dir dist .
	rm -rf build *.egg-info
	@ls -l dist/*.whl

run: system-deps $(STAMP)
	bash scripts/run-demo.sh

# R14 soak of the delivery path (not in CI): SOAK_SECONDS=600 SOAK_PERIOD=15 by default
soak: system-deps $(STAMP)
	$(BIN)/pytest -q -s -m soak tests/soak_delivery.py

# ARM64 proof (not in `make test`: ~5 min per emulated CPU on 2 cores): `edge-agent infer` on every bundle under
# models/, x86_64 against aarch64 emulated by qemu-user (Raspberry Pi 4 and 5 cores) with Debian's arm64 python3.11
# and the aarch64 wheels pinned in deploy/docker/requirements-arm64.txt. apt-get (root) brings qemu-user-static and
# mmdebstrap when missing; sample images from tests/data and $(SHARED)/datasets. See scripts/arm64_check.py.
SHARED ?= ../shared
arm64-check: $(STAMP)
	nice -n 10 $(BIN)/python scripts/arm64_check.py --shared $(SHARED)

# Re-pin the container recipes' dependencies with hashes (deploy/docker/requirements-*.txt) after pyproject changes.
lock: $(STAMP)
	$(BIN)/python scripts/lock_deps.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
