# Two entry points on a fresh machine: `make demo` and `make test` (each runs the idempotent set-up).
PY := .venv/bin/python

.PHONY: setup demo test fixtures bench clean
setup:
	bash scripts/setup.sh

# the bundled default model (trained shapes VLM when bundled, else the tiny generated fixture) on the bundled
# image, then the clip-trained model on the bundled clip
demo: setup
	$(PY) -m avis_llamacpp.cli demo
	@if [ -f avis_llamacpp/data/shapes-qwen-video/model.gguf ]; then echo; $(PY) -m avis_llamacpp.cli demo --video; fi

test: setup
	$(PY) -m pytest -q tests

fixtures: setup
	$(PY) -m convert.fixtures --all

clean:
	rm -rf .venv .pytest_cache
