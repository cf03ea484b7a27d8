# Two commands do all set-up: `make demo` and `make test`. Each builds .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test test-slow clean

$(VENV_STAMP): pyproject.toml client/pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel on local disk; anything looser downloads a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# the torch-free client distribution first: rtdiff depends on it for the protocol code
	$(PY) -m pip install --quiet -e ./client
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m rtdiff.runtime.cli demo pusht

test: $(VENV_STAMP)
	$(PY) -m pytest -q

test-slow: $(VENV_STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf .venv build *.egg-info
