# Two entry points for a fresh machine that has only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: demo proposals-demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

# Main job: SoCo pretraining of a small R18-FPN on the built-in default photos (proposals computed
# first, once). Running it again continues or reports the finished run.
demo: $(STAMP)
	$(BIN)/soco pretrain --out $(OUT) --resume

# The proposal stage alone, with a picture of one photo's proposals.
proposals-demo: $(STAMP)
	$(BIN)/soco proposals "$$($(BIN)/soco data photos --print-path)" -o $(OUT)-proposals
	$(BIN)/soco inspect $(OUT)-proposals
	$(BIN)/soco show $(OUT)-proposals --image mvtb/campus/P1070491.png -o $(OUT)-proposals.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) $(OUT)-proposals $(OUT)-proposals.png
