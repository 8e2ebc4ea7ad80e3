"""Answer one question for every image in a folder; one JSON line per image.

    python examples/batch_folder.py FOLDER "What is in the image?" --k 3 --tau pi/4 --out answers.jsonl"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avis_llamacpp import VLM, ImageError  # noqa: E402
from avis_llamacpp.cli import _tau  # noqa: E402
from avis_llamacpp.defaults import default_model_paths  # noqa: E402

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("question")
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--tau", type=_tau, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default="-")
    args = p.parse_args()
    model, mmproj = (args.model, args.mmproj) if args.model else default_model_paths()
    images = sorted(f for f in Path(args.folder).iterdir() if f.suffix.lower() in SUFFIXES)
    try:
        from tqdm import tqdm
        images_iter = tqdm(images, desc="images", file=sys.stderr)
    except ImportError:
        images_iter = images
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    with VLM(model, mmproj, n_ctx=4096) as vlm:
        for path in images_iter:
            try:
                ans = vlm.ask(path, args.question, k=args.k, tau=args.tau, max_tokens=args.max_tokens)
                row = {"image": path.name, "answer": ans.answer if args.k > 1 and ans.answer else ans.text,
                       "kept": ans.kept_tokens, "of": ans.image_tokens, "votes": ans.votes}
            except ImageError as e:  # a bad file does not stop the batch
                row = {"image": path.name, "error": str(e)}
            out.write(json.dumps(row) + "\n")
    if out is not sys.stdout:
        out.close()


if __name__ == "__main__":
    main()
