# The two commands of the README, plus helpers. Everything runs inside the pinned ComfyUI host
# that tools/host.py builds on first use (set LORATORIO_COMFYUI to use your own ComfyUI instead).
PYTHON ?= python3
HOST := $(PYTHON) tools/host.py
PORT ?= 8188

.PHONY: demo serve test compat gpu-check host lint format workflows

demo:  ## every method composes the toy world's trained LoRAs through ComfyUI's HTTP API; images, sheet, summary in out/demo
	$(HOST) run -- tools/demo.py $(DEMO_ARGS)

serve:  ## start ComfyUI with the pack, the toy world and the SD1.5 demo models for the graph editor (Ctrl-C stops it)
	$(HOST) run -- tools/demo_assets.py
	$(HOST) run -- tools/toy_world.py config --out out/serve
	$(HOST) serve -- --port $(PORT) --extra-model-paths-config $(CURDIR)/out/serve/extra_model_paths.yaml

test:  ## the whole test suite against the real ComfyUI host (installs Debian's Chromium for the graph-editor tests)
	$(PYTHON) tools/browser.py
	$(HOST) run -- -m pytest $(PYTEST_ARGS)

compat:  ## the whole suite against another ComfyUI tree: make compat COMFYUI=/path/to/ComfyUI (see docs/compatibility.md)
	@test -n "$(COMFYUI)" || { echo "usage: make compat COMFYUI=/path/to/ComfyUI (the folder with main.py)"; exit 2; }
	$(PYTHON) tools/browser.py
	$(PYTHON) tools/compat.py test --comfyui "$(COMFYUI)" $(if $(FRONTEND),--frontend $(FRONTEND)) -- $(PYTEST_ARGS)

gpu-check:  ## on a machine with an NVIDIA GPU (about 10 min): x floor for SD1.5 512 and SDXL 1024, N = 1..5, fp16 and bf16, and the per-layer table
	$(HOST) run -- tools/benchmark.py --models sd15-512,sdxl-1024 --adapters 1,2,3,4,5 --pools "" --repeats 1 \
		--methods loratorio,loratorio-lambda1,composite,switch,merge --dtype float16 --out out/gpu/float16
	$(HOST) run -- tools/benchmark.py --models sd15-512,sdxl-1024 --adapters 1,2,3,4,5 --pools "" --repeats 1 \
		--methods loratorio,loratorio-lambda1,composite,switch,merge --dtype bfloat16 --out out/gpu/bfloat16
	$(HOST) run -- tools/benchmark.py --per-layer --ranks 16,32,64,128 --adapters 2,4

host:  ## build (or reuse) the host and print where it is
	$(HOST) setup

lint:
	$(HOST) run -- -m ruff check .

format:
	$(HOST) run -- -m ruff format .

workflows:  ## regenerate example_workflows/ and their template pictures (needs `make serve` running)
	$(HOST) run -- tools/make_workflows.py --server http://127.0.0.1:$(PORT) --thumbnails
