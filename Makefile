# The two set-up commands: `make report` (the main job) and `make test`. Each makes .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The main job's backbones and recipe: tiny models that a 2-core CPU trains in minutes, three from random
# weights and tf_efficientnet_lite0 fine-tuned from the ImageNet weights its pip package ships.
BACKBONES ?= convnext_atto resnet18 test_vit tf_efficientnet_lite0
RECIPE ?= params/smoke.yaml
DATA ?=

.PHONY: report test test-all venv strip clean-reports bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

report: $(STAMP)
	$(VENV)/bin/tongue-nb sweep $(if $(DATA),--data $(DATA)) -f $(RECIPE) --backbones $(BACKBONES) --reports reports

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

strip: $(STAMP)
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean-reports:
	rm -rf reports/*.html runs/
