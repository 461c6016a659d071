# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is a CPU build that lies on this machine's disk; on a GPU box use e.g.
# `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install test lint system-deps demo demo-data demo-model demo-compare wordnet clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per install state: re-runs are instant until pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test]"
	# The parity reference (official implementation); --no-deps keeps timm/torchvision out.
	$(PIP) install --no-deps torchscale==0.3.0 fairscale==0.4.0
	touch $@

install: $(VENV)/.installed

EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
# Debian packages the tests use: Chromium for the end-to-end browser test (no browser download),
# the Noto emoji font for the demo-data builder test, rsvg-convert for the icon-corpus test.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 || [ ! -f $(EMOJI_FONT) ] || ! command -v rsvg-convert >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium fonts-noto-color-emoji librsvg2-bin >/dev/null; \
	  else echo "missing: run 'sudo apt-get install -y chromium fonts-noto-color-emoji librsvg2-bin' (tests that need them skip)"; fi; fi

# The bundled emoji dataset (committed in demo/data/emoji/), rebuilt from Debian's emoji font.
demo-data: install
	@test -f $(EMOJI_FONT) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null; \
	  else echo "run 'sudo apt-get install -y fonts-noto-color-emoji' first"; exit 1; fi; }
	$(BIN)/python demo/build_dataset.py

lint: install
	$(BIN)/ruff format --check beit3 indexer training app tests bench demo
	$(BIN)/ruff check beit3 indexer training app tests bench demo
	$(BIN)/lint-imports
	$(BIN)/mypy beit3 indexer

test: install system-deps lint
	$(BIN)/python -m pytest -q

# Index the bundled emoji set with the bundled model (incremental), then serve the app.
demo: install
	$(BIN)/beit3 demo

WORDNET := /usr/share/wordnet/data.noun
# The recipe's broad text (WordNet 3.0, Debian's wordnet-base: demo/corpora.py).
wordnet:
	@test -f $(WORDNET) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null; \
	  else echo "run 'sudo apt-get install -y --no-install-recommends wordnet-base' first"; exit 1; fi; }

# Reproduce demo/model from demo/data/emoji and WordNet with the project's recipe (about 100 min
# on 2 cores); demo-compare adds the same compute spent on fine-tuning from scratch.
demo-model: install wordnet
	$(BIN)/python demo/train_model.py

demo-compare: install wordnet
	$(BIN)/python demo/train_model.py --compare

clean:
	rm -rf $(VENV) .pytest_cache
