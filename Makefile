# Everything runs from a local virtual environment that the first target creates.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUILD_STAMP := $(VENV)/.build-stamp

.PHONY: run test test-fast bench chaos lint clean dist smoke

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: the agent on its built-in defaults, data in ./data, listening on 127.0.0.1:8089
run: $(STAMP)
	$(BIN)/etims-agent run

## test: the whole suite, slow crash tests included
test: $(STAMP)
	$(BIN)/python -m pytest

## test-fast: everything except the tests marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## bench: every benchmark (intake, KRA signing, a till beside head-office signing, start-up, memory and
## disk, TSMS sync) as one table, about 20 minutes; BENCH_ARGS=--quick for a fast look,
## BENCH_ARGS=--record to write docs/performance.md
bench: $(STAMP)
	$(BIN)/python bench/all.py $(BENCH_ARGS)

## chaos: tills on HTTP and serial, kill -9 at random moments, every upstream fault; prints what held
## (CI runs the short form; the long form by hand: make chaos CHAOS_CYCLES=300)
CHAOS_CYCLES ?= 12
chaos: $(STAMP)
	$(BIN)/python tests/chaos.py --cycles $(CHAOS_CYCLES)

## dist: the one-file binary dist/etims-agent (PyInstaller, installer/etims-agent.spec), rebuilt every time
$(BUILD_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[build]'
	@touch $(BUILD_STAMP)

dist: $(BUILD_STAMP)
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN \
		--distpath dist --workpath build/pyinstaller installer/etims-agent.spec
	@ls -l dist/etims-agent

## smoke: build, then run the binary (a sale signed and synced, clean SIGTERM), plainly and under the
## service unit's seccomp filters (installer/linux/hardened-exec.py: MemoryDenyWriteExecute,
## RestrictAddressFamilies, SystemCallFilter)
smoke: dist
	bash installer/smoke.sh dist/etims-agent
	SMOKE_WRAPPER="$(PYTHON) installer/linux/hardened-exec.py" bash installer/smoke.sh dist/etims-agent

lint: $(STAMP)
	$(BIN)/ruff check agent tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
