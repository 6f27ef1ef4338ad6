# Two commands set up a fresh machine: `make book` and `make test` (each creates .venv on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROFILE ?= smoke
CHAPTER ?= kd
PARAMS ?=
# Our pins replace any machine-wide pip constraints file (some machines cap torch below our pin).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Runs, teachers and caches of the book stay inside the build folder, nothing goes to $HOME.
export KDLIB_HOME ?= $(CURDIR)/_build/kdlib
export MPLCONFIGDIR := $(CURDIR)/_build/.matplotlib
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast book pdf chapter student-copies course lab bench clean lock

setup: $(STAMP)

# uv installs the same pinned set as pip (constraints.txt) about 5x faster: 31 s against 161 s for the whole
# environment on the 2-core machine, both from cold caches; pip stays the fallback when uv cannot be had.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install -q uv && $(VENV)/bin/uv pip install --python $(PY) -q -c constraints.txt -e '.[book,test,lab,course]'; } \
	  || $(PY) -m pip install -q -e '.[book,test,lab,course]'
	@touch $(STAMP)

# The suite on two pytest-xdist workers, one torch thread each (tests/conftest.py): on the 2-core machine the
# two run side by side in about half the time of one. Tests that must share a worker say so (CONTRIBUTING.md).
PYTEST_WORKERS ?= 2
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_XDIST) --durations=15 tests

# The edit-test loop: everything but the `slow` tests (end-to-end training, chapters, browser, Slurm).
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_XDIST) -m "not slow" tests

# KEEP="kd dkd" (or KEEP=all) keeps chapters as `make chapter` last executed them, other parameters included
KEEP ?=
book: $(STAMP)
	$(PY) -m kdlib book --profile $(PROFILE) $(foreach c,$(KEEP),--keep $(c))

# The whole book as one PDF (_build/latex/book.pdf) from the executed chapters `make book` left (those of
# another profile or parameters are executed again). Needs TeX from Debian: the command names what is missing.
pdf: $(STAMP)
	$(PY) -m kdlib book --profile $(PROFILE) --pdf

# Re-execute one chapter alone, then rebuild the HTML book (its page says which parameters it ran with):
# make chapter CHAPTER=dkd PARAMS="-p epochs 5 -p seeds '[0,1]'"; the next `make book KEEP=dkd` keeps it
chapter: $(STAMP)
	$(PY) -m kdlib book --profile $(PROFILE) --only $(CHAPTER) $(PARAMS)

# The chapters without outputs and solutions (exercise stubs instead), readable in JupyterLab: clean/*.ipynb
student-copies: $(STAMP)
	$(PY) -m kdlib course --student-copies clean

# The instructor's assignment set from the chapters' code exercises (nbgrader course folder _build/course):
# release/ for students, source/ with solutions and hidden tests, gradebook.db. Grading: see README.
course: $(STAMP)
	$(PY) -m kdlib course --out _build/course

# JupyterLab on the chapters as notebooks that read as the book reads (values filled in, MyST rendered):
# _build/lab/*.ipynb, from the executed chapters of the last `make book`/`make chapter` when there are any.
LAB_PORT ?= 8888
lab: $(STAMP)
	$(PY) -m kdlib course --lab _build/lab
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --port=$(LAB_PORT) $(if $(filter 0,$(shell id -u)),--allow-root) _build/lab/kd.ipynb

bench: $(STAMP)
	$(PY) -m kdlib bench

clean:
	rm -rf _build clean

# Re-pin every package of the current environment (after changing pyproject.toml's dependencies).
lock: $(STAMP)
	{ head -2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^kdlib'; } > constraints.new && mv constraints.new constraints.txt
