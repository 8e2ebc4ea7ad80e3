# Two entry points on a fresh machine: `make demo` and `make test` (each runs the idempotent set-up).
PY := .venv/bin/python

.PHONY: setup demo test fixtures bench clean
setup:
	bash scripts/setup.sh

# the bundled default model: the tiny random-weight LLaVA-style fixture (written in seconds, cached)
demo: setup
	@eval $$($(PY) -m convert.fixtures --family llava --size tiny --shell) && \
	$(PY) -m avis_llamacpp.cli ask --model "$$AVIS_MODEL" --mmproj "$$AVIS_MMPROJ" \
	    --image avis_llamacpp/data/shapes.png --max-tokens 32 "How many shapes are in the image?"

test: setup
	$(PY) -m pytest -q tests

fixtures: setup
	$(PY) -m convert.fixtures --all

clean:
	rm -rf .venv .pytest_cache
