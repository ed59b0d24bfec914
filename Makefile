# Personalize: the two commands a fresh machine needs.
#   make demo   set up the host and run the example workflow headless (the main job)
#   make test   set up the host and run the tests
#   make bench-quality   the toy DreamBench quality table (BENCH_ARGS=--quick for a short run)
PY := .venv/bin/python
DEMO_WORKFLOW ?= example_workflows/bootpig_reference.json
PYTEST_ARGS ?=
# small and short so that the demo finishes on a CPU; override for a real checkpoint on a GPU
DEMO_ARGS ?= --set EmptyLatentImage.width=128 --set EmptyLatentImage.height=128 --set KSampler.steps=4 \
	--set PersonalizeBootPIGReferenceEncoder.resolution=128

.PHONY: setup demo test checkpoint bench-quality clean

setup:
	bash scripts/setup.sh

checkpoint: setup
	$(PY) -m scripts.make_checkpoint

demo: checkpoint
	$(PY) -m scripts.run_workflow $(DEMO_WORKFLOW) --output-dir output/demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench-quality: setup
	$(PY) scripts/bench_quality.py $(BENCH_ARGS)

clean:
	rm -rf .cache output
