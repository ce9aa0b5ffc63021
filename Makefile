VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test install flops demo clean

install: $(STAMP)

# The stamp depends on requirements.txt so a change to it reinstalls.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): $(STAMP) requirements-demo.txt
	$(PY) -m pip install -r requirements-demo.txt
	touch $(DEMO_STAMP)

# Train, sample and score a pixel-space U-DiT on scikit-learn's 8x8 digits (CPU, ~12 min).
# MINUTES=20 make demo trains longer; OBJECTIVE=flow make demo trains with flow matching;
# REPA=1 make demo trains with representation alignment (U-REPA) against a digits encoder.
demo: $(DEMO_STAMP)
	$(PY) scripts/demo.py $(if $(MINUTES),--minutes $(MINUTES)) $(if $(OBJECTIVE),--objective $(OBJECTIVE)) $(if $(REPA),--alignment u-repa)

test: $(STAMP)
	$(PY) -m pytest -q tests

flops: $(STAMP)
	$(PY) models.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ */__pycache__
