"""Where does one KDV selection over a clip put its budget, against one per frame pair? (issue #35)

On the first 100 video-task test clips, the bundled clip model's kept sets at rho 0.75 with video_selection "joint"
and "per_chunk": their Jaccard overlap, how often they are the same set, and how many tokens the joint selection
gives each frame pair (per chunk always 16 of 64), on clips with a quiet stretch (shapes off screen for whole frame
pairs: how much of the budget the joint rule leaves on the empty pairs), on the crowded ones among them (one busy pair
holding 5-6 shapes: how many tokens the joint rule gives it) and on the others. Writes benchmarks/results/shapes-qwen-video/joint_vs_per_chunk_kept.json.

    .venv/bin/python benchmarks/video_joint_overlap.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import json  # noqa: E402

import numpy as np  # noqa: E402

from avis_llamacpp import VLM  # noqa: E402
from convert import video_task as vt  # noqa: E402
from convert.shapes_task import format_question  # noqa: E402
B = "avis_llamacpp/data/shapes-qwen-video"
out = {"rho": 0.75, "n": 100, "jaccard": [], "joint_per_chunk_counts": [], "same_set": 0, "quiet_pairs": [],
       "crowded": []}
with VLM(f"{B}/model.gguf", f"{B}/mmproj.gguf", n_ctx=2048, n_threads=1, n_threads_batch=1) as v:
    for i in range(100):
        it = vt.make_item("test", i)
        fr = vt.render_clip(it.clip)
        out["quiet_pairs"].append(sorted({t // 2 for t in it.clip.quiet}))
        out["crowded"].append(it.clip.crowded)
        sets = []
        for sel in ("joint", "per_chunk"):
            a = v.ask(None, format_question(it.question), video=fr, max_tokens=1, ratio=0.75, video_selection=sel)
            off = np.cumsum([0] + a.image_tokens[:-1])
            sets.append(set(np.concatenate([np.asarray(im["kept"]) + o for im, o in zip(a.images, off)]).tolist()))
            if sel == "joint":
                out["joint_per_chunk_counts"].append(a.kept_tokens)
        j = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
        out["jaccard"].append(round(j, 4))
        out["same_set"] += sets[0] == sets[1]
c = np.array(out["joint_per_chunk_counts"])
quiet = np.array([bool(q) for q in out["quiet_pairs"]])
jac = np.array(out["jaccard"])
on_quiet = [c[i, p] for i, p in enumerate(out["quiet_pairs"]) if p]
on_busy = [np.delete(c[i], p) for i, p in enumerate(out["quiet_pairs"]) if p]
crowded = np.array(out["crowded"])
on_crowded = [np.delete(c[i], p) for i, p in enumerate(out["quiet_pairs"]) if crowded[i]]
out["summary"] = {"quiet_clips": int(quiet.sum()),
                  "mean_jaccard_quiet_clips": float(jac[quiet].mean()) if quiet.any() else None,
                  "mean_jaccard_other_clips": float(jac[~quiet].mean()),
                  "joint_kept_per_quiet_pair_mean": float(np.concatenate(on_quiet).mean()) if on_quiet else None,
                  "joint_kept_per_busy_pair_of_quiet_clips_mean":
                      float(np.concatenate(on_busy).mean()) if on_busy else None,
                  "crowded_clips": int(crowded.sum()),
                  "joint_kept_on_the_crowded_pair_mean": float(np.concatenate(on_crowded).mean()) if on_crowded else None,
                  "mean_jaccard_crowded_clips": float(jac[crowded].mean()) if crowded.any() else None,
                  "mean_jaccard": float(np.mean(out["jaccard"])), "min_jaccard": float(np.min(out["jaccard"])),
                  "same_set_clips": out["same_set"], "joint_kept_per_chunk_mean": c.mean(0).round(2).tolist(),
                  "joint_kept_per_chunk_min": c.min(0).tolist(), "joint_kept_per_chunk_max": c.max(0).tolist(),
                  "share_of_clips_with_a_chunk_off_16_by_more_than_3": float(np.mean(np.abs(c - 16).max(1) > 3))}
out["command"] = ".venv/bin/python benchmarks/video_joint_overlap.py"
json.dump(out, open("benchmarks/results/shapes-qwen-video/joint_vs_per_chunk_kept.json", "w"), indent=1)
print(json.dumps(out["summary"]))
