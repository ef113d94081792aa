# The two commands of the README.
PY ?= python3

.PHONY: install demo test test-all
install:
	$(PY) -m pip install -q -e ".[examples]"

demo: install
	$(PY) -m hago.examples.quickstart

test:
	bash .ci/run

test-all:
	$(PY) -m pytest -q
