# Personalize: the two commands a fresh machine needs.
#   make demo   set up the host and run the example workflow headless on the toy world's model (the main job)
#   make test   set up the host and run the tests
#   make bench-quality   the toy DreamBench quality table (BENCH_ARGS=--quick for a short run)
#   make demo-sd15       the BootPIG workflow on a generated full-size SD1.5 checkpoint (random weights: noise images)
#   make test-frontend-latest   the browser tests against the newest comfyui-frontend-package (pinned server)
#   make layout / make thumbnails   lay out the example workflows in the page / render their template thumbnails
PY := .venv/bin/python
# the pack's own trained toy model (weights/toyworld): text to image, 4 images of one prompt
DEMO_WORKFLOW ?= example_workflows/toyworld_txt2img.json
DEMO_ARGS ?=
PYTEST_ARGS ?=
# make test runs the suite in TEST_WORKERS processes (pytest-xdist; a test file stays in one process, so module and
# session fixtures are built once per process), each torch on TEST_THREADS threads (inherited by the servers and
# torchrun children the tests start). The suite's tensors are small: one process keeps a second core mostly idle.
# TEST_WORKERS=0 TEST_THREADS=2: the whole suite in one process.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
# small and short so that it finishes on a CPU; override for a real checkpoint on a GPU
SD15_ARGS ?= --set EmptyLatentImage.width=128 --set EmptyLatentImage.height=128 --set KSampler.steps=4 \
	--set PersonalizeBootPIGReferenceEncoder.resolution=128

FRONTEND_LATEST ?= .cache/frontend-latest

.PHONY: setup demo demo-sd15 test test-frontend-latest layout thumbnails checkpoint bench-quality clean

setup:
	bash scripts/setup.sh

checkpoint: setup
	$(PY) -m scripts.make_checkpoint

demo: setup
	$(PY) -m scripts.run_workflow $(DEMO_WORKFLOW) --output-dir output/demo $(DEMO_ARGS)

demo-sd15: checkpoint
	$(PY) -m scripts.run_workflow example_workflows/bootpig_reference.json --output-dir output/demo-sd15 $(SD15_ARGS)

test: setup
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the newest frontend package into its own folder (never the venv), served by the pinned server through PYTHONPATH
test-frontend-latest: setup checkpoint
	$(PY) -m pip install --disable-pip-version-check -q --upgrade --no-deps --target $(FRONTEND_LATEST) comfyui-frontend-package
	PERSONALIZE_FRONTEND_PATH=$(FRONTEND_LATEST) $(PY) -m pytest tests/test_browser.py $(PYTEST_ARGS)

layout: setup
	$(PY) -m scripts.layout_workflows $(FILES)

thumbnails: setup
	$(PY) -m scripts.thumbnails $(FILES)

bench-quality: setup
	$(PY) scripts/bench_quality.py $(BENCH_ARGS)

clean:
	rm -rf .cache output
