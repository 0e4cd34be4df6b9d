# Two entry points for a fresh machine that has only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

# Main job on the built-in default photos: proposals for every photo, then a picture of one.
demo: $(STAMP)
	$(BIN)/soco data photos
	$(BIN)/soco proposals "$$($(BIN)/soco data photos --print-path)" -o $(OUT)/proposals
	$(BIN)/soco inspect $(OUT)/proposals
	$(BIN)/soco show $(OUT)/proposals --image mvtb/campus/P1070491.png -o $(OUT)/proposals.png
	@echo "picture of proposals: $(OUT)/proposals.png"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
