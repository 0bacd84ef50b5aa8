# Two commands a newcomer needs: `make demo` and `make test`.
# Both create (or reuse) .venv with pip; torch comes from the local wheel cache where pip has one.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
SHARED ?= ../shared

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install -q $(TORCH_PINS) || $(PIP) install -q torch torchvision
	$(PIP) install -q -e '.[test]'
	touch $@

.PHONY: setup demo test bench clean device-data device-smoke
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/epcli demo

test: setup
	$(VENV)/bin/python -m pytest -q

# The device check (docs/benchmarks.md). device-data fills the git-ignored .data/ with what a bare GPU machine
# lacks (the wheels, the CIFAR-10 archive): carry it there. device-smoke runs every step on the CPU (CI).
device-data:
	mkdir -p .data/wheels
	cp $(SHARED)/wheels/*.whl .data/wheels/
	cp $(SHARED)/datasets/cifar10-jpeg.tar.xz .data/

device-smoke: setup
	$(VENV)/bin/python bench/device_check.py build/device-smoke --smoke

clean:
	rm -rf $(VENV) build *.egg-info
