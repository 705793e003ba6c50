# The two commands of the README:  make demo  and  make test
# Everything else here is what they need. PyTorch is installed with plain pip on purpose:
# this machine serves torch==2.14.1 / torchvision==0.29.1 from its own disk to pip only.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.14.1 torchvision==0.29.1
EXTRAS  ?= onnx,serve,parquet,dev,ray,celery,pretrained

.PHONY: venv demo test lint bench clean system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/imgtriage demo

test: venv
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests bench examples

# Debian packages the tests use when present (Fashion-MNIST, Redis, Chromium, FITS frames).
system-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  dataset-fashion-mnist redis-server chromium chromium-driver eso-midas-testdata

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
