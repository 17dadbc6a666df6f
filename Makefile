# Two commands: `make lab` (set up, open the notebooks) and `make test` (set up, run every test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned first so pip never resolves a multi-GB CUDA build on CPU machines; GPU users get the
# CUDA build of the same release from PyPI.
TORCH  ?= torch==2.13.0

.PHONY: lab test setup browser clean gpu-check book

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev,ray,book]'
	touch $@

lab: setup
	$(BIN)/jupyter lab notebooks/index.ipynb $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# The browser tests drive Debian's Chromium; install it when we may (root + apt), never download one.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq chromium) ; } || \
	  echo "chromium not found: notebooks will run headless through nbclient instead (apt-get install chromium)"

test: setup browser
	$(BIN)/python -m pytest --durations=40

# The one prepared GPU check (benchmarks/gpu_check.py): every notebook's rank functions on this machine's
# GPUs, checked against the CPU, and the GPU figures, in one table ($(OUT) or runs/gpu_check).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# The course as a static website (Jupyter Book 1), built from the notebooks the tests executed and saved
# in $(EXECUTED) (run `make test` first): open build/book/html/index.html. Nothing is executed again.
EXECUTED ?= build/executed
book: setup
	$(BIN)/python book/build.py --executed $(EXECUTED) --out build/book

clean:
	rm -rf $(VENV) runs
