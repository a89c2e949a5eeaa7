# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test test-fast bench plots clean-demo bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# pip compiles what it installs one file at a time; compileall uses every core (41 s against 77 s on 2).
# torch's one file in Python 3.12 syntax, which pip leaves uncompiled too, is left out.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib
	touch $@

# The package's bytecode, compiled once: where PYTHONDONTWRITEBYTECODE is set, every process (each DVC stage,
# each command a test runs) would compile it again (0.3-0.5 s each).
bytecode: $(VENV)/.installed
	$(BIN)/python -m compileall -q pipeline stages

demo: bytecode
	$(BIN)/dvc repro
	@cat reports/compare.md

# Two test processes (pytest-xdist), each computing on one thread (tests/conftest.py), for the 2 cores; the
# one that runs out of tests takes some of the other's (worksteal: 627 s against 652 s, one run each).
test: bytecode
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The suite without the tests marked slow (each over about 10 s on 2 cores), for a quick check while editing.
test-fast: bytecode
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# `dvc plots show` with Vega inline (fetched once from the npm registry), readable offline.
VEGA_PAGE := build/vega/dvc_plots.html

$(VEGA_PAGE): tools/offline_plots_page.py | $(BIN)/python
	$(BIN)/python tools/offline_plots_page.py $@

plots: $(VENV)/.installed $(VEGA_PAGE)
	$(BIN)/dvc plots show --html-template $(VEGA_PAGE)

# docs/audit.md's picture of the demo's audit page (after `make demo`).
docs/audit_report.png: reports/audit/lite0_160/index.html
	mkdir -p docs build
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir=$(CURDIR)/build/chromium \
		--window-size=1000,1500 --screenshot=$(CURDIR)/$@ $(CURDIR)/$<
	$(BIN)/python -c 'import sys; from PIL import Image; Image.open(sys.argv[1]).quantize(64).save(sys.argv[1], optimize=True)' $@

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench.py --out benchmarks/cpu.json

clean-demo:
	rm -rf data/demo features models reports
