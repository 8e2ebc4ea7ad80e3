"""Ask one question about one image (defaults: the bundled image and the tiny generated model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avis_llamacpp import VLM  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--image", default=str(ROOT / "avis_llamacpp" / "data" / "shapes.png"))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("question", nargs="?", default="How many shapes are in the image?")
    args = p.parse_args()
    if not args.model:
        from convert.fixtures import make_fixture
        fx = make_fixture("llava", "tiny")
        args.model, args.mmproj = str(fx.model), str(fx.mmproj)
    with VLM(args.model, args.mmproj, n_ctx=2048) as vlm:
        ans = vlm.ask(args.image, args.question, max_tokens=args.max_tokens)
    print(ans.text)
    print({"image_tokens": ans.image_tokens, "timings_s": {k: round(v, 4) for k, v in ans.timings.items()}})


if __name__ == "__main__":
    main()
