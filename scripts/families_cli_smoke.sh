#!/bin/bash
# avis ask --tau pi/4 on every native family's fixture; prints key_source
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY' > "${TMPDIR:-/tmp}/avis-fams.txt"
import sys; sys.path.insert(0, '.')
from convert.fixtures import make_fixture
from convert.fixture_gemma3 import make_gemma3_fixture
from convert.fixture_gemma4v import make_gemma4v_fixture
from convert.fixture_pixtral import make_pixtral_fixture
from convert.fixture_internvl import make_internvl_fixture
from convert.fixture_idefics3 import make_idefics3_fixture
out = __import__("os").environ.get("TMPDIR", "/tmp") + "/avis-famfx"
fx = {"llava": make_fixture("llava", out_dir=out), "qwen25vl": make_fixture("qwen25vl", out_dir=out),
      "qwen3vl": make_fixture("qwen3vl", out_dir=out), "ldpv2": make_fixture("ldpv2", out_dir=out),
      "gemma3": make_gemma3_fixture(out), "gemma4v": make_gemma4v_fixture(out), "pixtral": make_pixtral_fixture(out),
      "lightonocr": make_pixtral_fixture(out, projector="lightonocr"), "internvl": make_internvl_fixture(out),
      "idefics3": make_idefics3_fixture(out, "idefics3"), "lfm2": make_idefics3_fixture(out, "lfm2")}
for k, f in fx.items():
    print(k, f.model, f.mmproj)
PY
while read fam model mmproj; do
  r=$(.venv/bin/python -m avis_llamacpp.cli ask -m "$model" --mmproj "$mmproj" --threads 1 --tau pi/4 --max-tokens 4 --image avis_llamacpp/data/shapes.png --json "What is it?" 2>/dev/null | .venv/bin/python -c "import json,sys; d=json.load(sys.stdin); print(d['images'][0]['key_source'], d['image_tokens'], d['kept_tokens'])")
  echo "$fam: $r"
done < "${TMPDIR:-/tmp}/avis-fams.txt"
