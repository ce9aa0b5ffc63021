VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test install flops clean

install: $(STAMP)

# The stamp depends on requirements.txt so a change to it reinstalls.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

flops: $(STAMP)
	$(PY) models.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ */__pycache__
