"""Why is joint KDV not ahead of per-chunk KDV at rho 0.75 on clips with a quiet stretch? (issue #35)

On the first 100 video-task test clips, those with a quiet stretch: the bundled clip model's last-block keys of each
frame pair (captured on an unpruned ask), scored as one selection over the clip (kdv_scores on all pairs' keys); the
mean score of empty-pair and busy-pair tokens, how alike each pair's tokens are (cosine to the pair's mean key), the
share of the top quarter that falls on empty pairs, and how many tokens show a shape (the trainer's per-token
labels, so this needs torch) against the budget. Writes benchmarks/results/shapes-qwen-video/joint_keys_quiet_clips.json.

    .venv/bin/python benchmarks/video_joint_keys.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from avis_llamacpp import VLM
from avis_llamacpp import scorer as sc
from avis_llamacpp.kdv import kdv_scores, select_tokens
from convert import video_task as vt
from convert.shapes_task import format_question

KEYS = []
orig = sc.ImageScorer.recorder
def recorder(self, image_meta):
    inner = orig(self, image_meta)
    def record(chunk, embeddings):
        tk, _ = self.scored_keys(chunk, embeddings)
        KEYS.append(np.asarray(tk.keys))
        return inner(chunk, embeddings)
    return record
sc.ImageScorer.recorder = recorder
B = "avis_llamacpp/data/shapes-qwen-video"
OUT = "benchmarks/results/shapes-qwen-video/joint_keys_quiet_clips.json"
rows = []
with VLM(f"{B}/model.gguf", f"{B}/mmproj.gguf", n_ctx=2048, n_threads=1, n_threads_batch=1) as v:
    for i in range(100):
        it = vt.make_item("test", i)
        if not it.clip.quiet:
            continue
        KEYS.clear()
        v.ask(None, format_question(it.question), video=vt.render_clip(it.clip), max_tokens=1)
        keys = np.concatenate(KEYS, 0)  # [tokens, heads, dim], chunk-major
        n = KEYS[0].shape[0]
        s = kdv_scores(keys)  # joint: one anchor over the clip
        quiet_pairs = sorted({t // 2 for t in it.clip.quiet})
        pair = np.repeat(np.arange(len(KEYS)), n)
        empty = np.isin(pair, quiet_pairs)
        # cosine of each token to its own pair's mean key direction (how alike the pair's tokens are)
        kn = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
        within = []
        for p in range(len(KEYS)):
            m = kn[pair == p].mean(0)
            m /= np.linalg.norm(m, axis=-1, keepdims=True)
            within.append(float((kn[pair == p] * m).sum(-1).mean()))
        keep = select_tokens(s, ratio=0.75)  # the joint selection at rho 0.75
        rows.append({"id": it.id, "quiet_pairs": quiet_pairs,
                     "score_empty_mean": float(s[empty].mean()), "score_busy_mean": float(s[~empty].mean()),
                     "score_busy_top16_mean": float(np.sort(s[~empty])[-16:].mean()),
                     "within_pair_cos_empty": float(np.mean([within[p] for p in quiet_pairs])),
                     "within_pair_cos_busy": float(np.mean([w for p, w in enumerate(within) if p not in quiet_pairs])),
                     "kept_empty_share": float(np.isin(pair[keep], quiet_pairs).mean()),
                     "empty_token_share": float(empty.mean())})
summ = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("id", "quiet_pairs")}
summ["clips"] = len(rows)
print(json.dumps(summ, indent=1))
json.dump({"summary": summ, "rows": rows, "command": ".venv/bin/python benchmarks/video_joint_keys.py (first 100 test clips, "
           "those with a quiet stretch; scores = kdv_scores on the clip's keys, higher = kept first)"},
          open(OUT, "w"), indent=1)

# how many tokens show a shape (training labels: colour under the token), against the budget of 64
from training.train_video_qwen import clip_token_labels  # noqa: E402
n_obj = []
for i in range(100):
    it = vt.make_item("test", i)
    if it.clip.quiet:
        n_obj.append(int((clip_token_labels(it.clip)[0] > 0).sum()))
objects = {"object_tokens_per_clip_mean": float(np.mean(n_obj)), "object_tokens_per_clip_max": int(np.max(n_obj)),
           "share_of_clips_over_64": float(np.mean(np.array(n_obj) > 64)),
           "share_of_clips_over_25": float(np.mean(np.array(n_obj) > 25))}
print(json.dumps(objects))
res = json.load(open(OUT))
res["summary"]["objects"] = objects
json.dump(res, open(OUT, "w"), indent=1)
