# The two commands of the README, plus helpers. Everything runs inside the pinned ComfyUI host
# that tools/host.py builds on first use (set LORATORIO_COMFYUI to use your own ComfyUI instead).
PYTHON ?= python3
HOST := $(PYTHON) tools/host.py
PORT ?= 8188

.PHONY: demo test host lint format

demo:  ## write the demo checkpoint and LoRAs, start ComfyUI with the pack, print its URL (Ctrl-C stops it)
	$(HOST) run -- tools/demo_assets.py
	$(HOST) serve --port $(PORT)

test:  ## the whole test suite against the real ComfyUI host
	$(HOST) run -- -m pytest $(PYTEST_ARGS)

host:  ## build (or reuse) the host and print where it is
	$(HOST) setup

lint:
	$(HOST) run -- -m ruff check .

format:
	$(HOST) run -- -m ruff format .
