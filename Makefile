# One-command set-up on a fresh machine: `make test` and `make book` create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers; "loadfile" keeps all cells of one notebook in one kernel, in order.
WORKERS ?= 2
CHAPTER ?=

.PHONY: test test-chapter book clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on a CPU-only machine this takes the CPU build; an unpinned torch may pull a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

## Run every unit test and every chapter notebook (fast mode, CPU).
test: $(STAMP)
	DLDNA_FAST=1 MPLBACKEND=Agg $(PY) -m pytest -n $(WORKERS) --dist loadfile --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=900 -q tests chapters

## Run one chapter notebook: make test-chapter CHAPTER=chapters/01_attention_cost.ipynb
test-chapter: $(STAMP)
	DLDNA_FAST=1 MPLBACKEND=Agg $(PY) -m pytest --nbval-lax --nbval-current-env -v $(CHAPTER)

## Build the website into _build/html from the outputs stored in the notebooks (nothing is re-executed).
book: $(STAMP)
	$(PY) book/build_site.py --source .

clean:
	rm -rf _build
