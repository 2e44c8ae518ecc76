# The two commands a user needs: `make demo` and `make test`. Both set up what they need.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test unit lint bench bench-nodes bench-many bench-idle demo demo-down lock clean images image-amd64 image-arm64 push-images print-image

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

unit:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Format, lint, strict types on the package, the layering contract (pyproject.toml), and the
# GitHub workflows (actionlint, with shellcheck on their run: scripts; both installed by setup.sh).
LINT_PATHS := operator tools/controlplane/controlplane scripts benchmarks tests
lint:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	.venv/bin/ruff format --check $(LINT_PATHS)
	.venv/bin/ruff check $(LINT_PATHS)
	.venv/bin/mypy
	.venv/bin/lint-imports
	.venv/bin/actionlint

# Own CPU of the unlock against the hardware floor, wall time, and disk writes system-wide, per
# pipeline. Environment: IU_BENCH_SIZE_MIB (1050), IU_BENCH_ROUNDS (7), IU_BENCH_TMPFS=1 (Engine
# data roots on tmpfs), IU_BENCH_ENGINE_TMP_TMPFS=1 (only Docker's DOCKER_TMPDIR), IU_BENCH_SMOKE=1 (tiny, < 1 min); BENCH_ARGS passes flags (benchmarks/bench_unlock.py --help).
BENCH_ARGS ?=
bench:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	$(PY) benchmarks/bench_unlock.py $(BENCH_ARGS)

# Per-node status at scale against the real API server: object size, write latency, watch
# events for 50, 200 and 1000 nodes (IU_BENCH_NODES=50,200 for others); README, "Scale".
bench-nodes: setup
	$(PY) benchmarks/bench_nodes.py

# Many satisfied ImageUnlocks (the fast path) on 2 agent processes + the controller, against
# the real API server: apply -> all Ready, API requests (audit log) and CPU per resource, per
# node; IU_BENCH_MANY_COUNTS=100 for one count. README, "Scale".
IU_BENCH_MANY_COUNTS ?= 100,1000
bench-many: setup
	$(PY) benchmarks/bench_many.py --counts $(IU_BENCH_MANY_COUNTS) $(BENCH_ARGS)

# The same fleet left idle once everything is Ready: API requests per idle minute (audit log,
# watches apart), CPU % of a core and RSS per role, over IU_BENCH_IDLE_SECONDS (120). README, "Scale".
IU_BENCH_IDLE_SECONDS ?= 120
bench-idle: setup
	$(PY) benchmarks/bench_idle.py --seconds $(IU_BENCH_IDLE_SECONDS) $(BENCH_ARGS)

demo: setup
	$(PY) scripts/demo.py up

demo-down:
	@if [ -x $(PY) ]; then $(PY) scripts/demo.py down; else echo "nothing to stop"; fi

# The operator image for amd64 and arm64 (scripts/build-images.sh; README.md, "Architectures"):
# $(IMAGE):$(VERSION)-amd64 and -arm64 from local Debian bases, no registry needed.
# push-images pushes both and the manifest list $(IMAGE):$(VERSION), the one name the chart and
# manifests/ use (each node pulls its own architecture).
IMAGE ?= azaion/imageunlock
VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' operator/imageunlock/__init__.py)
BUILD_IMAGES := IMAGE=$(IMAGE) VERSION=$(VERSION) bash scripts/build-images.sh
images:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	$(BUILD_IMAGES) amd64 arm64
image-amd64:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	$(BUILD_IMAGES) amd64
image-arm64:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	$(BUILD_IMAGES) arm64
push-images:
	SETUP_SKIP_CONTROLPLANE=1 bash scripts/setup.sh
	$(BUILD_IMAGES) --push amd64 arm64
print-image:
	@echo $(IMAGE):$(VERSION)

# Re-resolve requirements.in into the fully pinned requirements.lock.
lock:
	rm -rf .lockvenv && python3 -m venv .lockvenv
	.lockvenv/bin/pip install -qq -r requirements.in
	.lockvenv/bin/pip freeze --exclude-editable --all | grep -v "^pip==" | LC_ALL=C sort > requirements.lock
	rm -rf .lockvenv

clean:
	rm -rf .venv .pytest_cache build *.egg-info operator/*.egg-info
