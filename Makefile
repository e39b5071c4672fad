# The two commands: `make demo` and `make test`. Both create .venv when missing and install into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject, which takes any recent release) to the builds this
# environment serves locally; override with `make TORCH_PINS= test` to take whatever pip resolves.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The install builds the C++ kernel. Where it cannot be built, plain torch ops are used, unless GAAF_KERNELS=on
# (.ci/run): then the install fails, and so would every test that uses the kernel.

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/gaaf-patch kernels || { [ "$$GAAF_KERNELS" != on ] && \
		echo "(no C++ kernel: training uses plain torch ops, same results, slower)"; }
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gaaf-patch resnet50 --strip-dropout

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check gaaf_patch tests benchmarks
	$(BIN)/ruff format --check gaaf_patch tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
