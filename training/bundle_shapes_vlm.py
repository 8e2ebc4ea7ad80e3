"""Copy a trained GGUF pair into the package and merge the training stages' records into training.json.

    python -m training.bundle_shapes_vlm [STAGE1/training.json ...] FINAL_OUT_DIR DEST_DIR

Earlier stages (runs continued with --init-from) are listed first; a single run needs only its output folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def bundle(stage_files: list[Path], final_dir: Path, dest: Path) -> dict:
    """Copy final_dir/{model,mmproj}.gguf to dest and write dest/training.json covering every stage."""
    stages = [json.loads(p.read_text()) for p in stage_files]
    final = json.loads((final_dir / "training.json").read_text())
    if not stage_files or stage_files[-1].resolve() != (final_dir / "training.json").resolve():
        stages.append(final)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.gguf", "mmproj.gguf"):
        shutil.copyfile(final_dir / name, dest / name)
    info = {
        "seed": final["seed"],
        "command": " && ".join(s["command"] for s in stages),
        "dims": final["dims"],
        "n_params": final["n_params"],
        "train_seconds": round(sum(s["train_seconds"] for s in stages), 1),
        "steps_done": sum(s["steps_done"] for s in stages),
        "final_train_loss": final["final_train_loss"],
        "torch": final["torch"],
        "threads": final["threads"],
        "files": {n: (dest / n).stat().st_size for n in ("model.gguf", "mmproj.gguf")},
        "stages": [{k: v for k, v in s.items() if k not in ("dims", "files")} for s in stages],
    }
    (dest / "training.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(__doc__)
        return 2
    *stages, final, dest = args
    info = bundle([Path(p) for p in stages], Path(final), Path(dest))
    print(json.dumps({k: info[k] for k in ("train_seconds", "steps_done", "final_train_loss", "files")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
