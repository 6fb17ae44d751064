# Two commands from a fresh clone (README: Quick start):
#   make train ARGS="model=resnet18 stage=finetune"   python train.py $(ARGS)
#   make test                                         python -m pytest -q (README: Tests)
# Both first create .venv (if missing) and install the project into it as README: Install says;
# the install is redone when pyproject.toml changes (the editable install follows the sources).
# The environment passes through: RESNET_CIFAR_DATA (the folder holding cifar-10-batches-py;
# unset, data/, downloaded there if missing), CI, TORCH_HOME, ...

PYTHON ?= python3
VENV ?= .venv
# The README's torch line; a CUDA build: make train TORCH="torch==2.14.1 torchvision==0.29.1 --index-url ..."
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: train test

train: $(VENV)/.installed
	$(VENV)/bin/python train.py $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(TORCH)
	$(VENV)/bin/python -m pip install -e ".[dev]"
	touch $@
