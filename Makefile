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

gpu-check:  ## on a machine with an NVIDIA GPU (about 7 min): whole runs against KSampler and steps against the floor at N = 4 (SD1.5 512, SDXL 1024, fp16), and the per-layer table
	$(HOST) run -- tools/benchmark.py --models sd15-512,sdxl-1024 --adapters 4 --interleaved 2:3,2:0 --whole-run-steps 20 \
		--repeats 3 --dtype float16 --out out/gpu/interleaved
	$(HOST) run -- tools/benchmark.py --models sd15-512,sdxl-1024 --adapters 4 --pools "" --repeats 1 \
		--methods loratorio,loratorio-lambda1,composite,switch,merge,hooks --dtype float16 --out out/gpu/float16
	$(HOST) run -- tools/benchmark.py --per-layer --ranks 32 --adapters 4

host:  ## build (or reuse) the host and print where it is
	$(HOST) setup

lint:
	$(HOST) run -- -m ruff check .

format:
	$(HOST) run -- -m ruff format .

workflows:  ## regenerate example_workflows/ and their template pictures (needs `make serve` running)
	$(HOST) run -- tools/make_workflows.py --server http://127.0.0.1:$(PORT) --thumbnails
