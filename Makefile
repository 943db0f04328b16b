# Two entry points (see README): `make train` runs the main job, `make test` runs the tests.
# Both create .venv with the pinned CPU stack first (scripts/setup_env.sh, idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?= -n 2 -q

.PHONY: venv train test

venv:
	bash scripts/setup_env.sh

train: venv
	$(PY) examples/train_retrieval.py

# The linter and the type checker run first (seconds), over the package.
test: venv
	$(PY) -m ruff check torchrec_hstu
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)
