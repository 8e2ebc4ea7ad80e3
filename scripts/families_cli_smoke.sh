#!/bin/bash
# avis ask --tau pi/4 on every registered family's tiny fixture (convert/fixtures.py REGISTRY); prints key_source
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY' > "${TMPDIR:-/tmp}/avis-fams.txt"
import os, sys; sys.path.insert(0, '.')
from convert.fixtures import REGISTRY, make_fixture
out = os.environ.get("TMPDIR", "/tmp") + "/avis-famfx"
for family, entry in REGISTRY.items():
    if "tiny" in entry.sizes:
        f = make_fixture(family, "tiny", out_dir=out)
        print(family, f.model, f.mmproj)
PY
while read fam model mmproj; do
  r=$(.venv/bin/python -m avis_llamacpp.cli ask -m "$model" --mmproj "$mmproj" --threads 1 --tau pi/4 --max-tokens 4 --image avis_llamacpp/data/shapes.png --json "What is it?" 2>/dev/null | .venv/bin/python -c "import json,sys; d=json.load(sys.stdin); print(d['images'][0]['key_source'], d['image_tokens'], d['kept_tokens'])")
  echo "$fam: $r"
done < "${TMPDIR:-/tmp}/avis-fams.txt"
