# The two set-up commands: `make report` (the main job) and `make test`. Each makes .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The main job's backbones and recipe: tiny models that a 2-core CPU trains in minutes, tf_efficientnet_lite0
# fine-tuned from the ImageNet weights its pip package ships and a ConvNeXt and a ViT from random weights (the
# longest first, so that two workers finish together).
BACKBONES ?= tf_efficientnet_lite0 convnext_atto test_vit
RECIPE ?= params/smoke.yaml
DATA ?=
# The smoke recipe's tiny CPU models train two at a time, one thread each (faster than one at a time on all the
# cores); any other recipe, one at a time unless WORKERS is given (`sweep --workers`).
WORKERS ?= $(if $(filter params/smoke.yaml,$(RECIPE)),2)

.PHONY: report test test-all venv strip clean-reports bench browser

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'  # constraints.txt: the release of each package
	$(PY) -m tongue_nb.fonts  # the Regular CJK face for Chinese/Japanese/Korean names in figures, built once
	touch $(STAMP)

report: $(STAMP)
	$(VENV)/bin/tongue-nb sweep $(if $(DATA),--data $(DATA)) -f $(RECIPE) --backbones $(BACKBONES) $(if $(WORKERS),--workers $(WORKERS)) --reports reports

# Headless Chromium for the tests that read the HTML reports as a reader sees them (tests/test_pages.py);
# installed with apt-get where it is missing and we may, else those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed: the report-page tests will be skipped"

# Two test processes (pytest-xdist), each test file on one of them (module fixtures are built once): most tests
# run one thread, so two keep both cores busy; tests/conftest.py gives each its share of threads.
TEST_WORKERS ?= 2

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-all: $(STAMP) browser
	$(PY) -m pytest -q -m '' -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

strip: $(STAMP)
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean-reports:
	rm -rf reports/*.html runs/
