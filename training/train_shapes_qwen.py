"""Train the Qwen2.5-VL-architecture shapes VLM on CPU, for pruned inputs, and export it as a GGUF pair.

Reproduce the bundled model (PyTorch 2.13 CPU, one torch thread; the recipe's one command, then the temperature
choice and calibration on the calibration split, and the evaluation):

    .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    .venv/bin/python -m training.train_shapes_qwen --seed 0 --max-minutes 55 --threads 1 \
        --init-text-from avis_llamacpp/data/shapes-vlm/model.gguf --work /tmp/sq --out /tmp/sq/out
    python -m convert.shapes_task --split calibration --n 400 --out /tmp/cal400
    (avis calibrate at --temperature 0.3 / 0.5 / 0.7 / 1.0, then training/choose_temperature.py: see its docstring)
    .venv/bin/python -m training.eval_shapes_vlm --model-dir /tmp/sq/out --n 300 --k 7 --parity 50 --parity-ratio 0.75

The run is time-capped (the LR schedule anneals by wall clock), so another machine does a different number of
steps; training.json records what this one did (1980 steps). The architecture is the paper's (qwen2.5vl_merger
mmproj + qwen2vl text model): a window-attention ViT with 2-D RoPE (patch 7 on 224 px: 32 x 32 patches, 112 px
windows in the first two blocks, the last over the whole image), a 2x2 merger to 256
image tokens per image, and a text model with M-RoPE, so an image token keeps its (t, h, w) position wherever it
was pruned. The text model starts from the llava-style shapes model's text weights (its q/k rows permuted from
RoPE NORM to NEOX pairs: the same function on text), so this run spends its time on the new vision tower and on
the image-position change; that model took 44 minutes, so the whole recipe is 44 + 55 minutes on one thread.

Training for pruned inputs (--prune-prob): in that share of batches every image keeps n of 256 tokens (n drawn
so the kept fraction is uniform in [0.1, 1)), chosen by KDV on the current model's own last-block keys (as the
plugin scores them), at random, or evenly spread, with each kept token at its original M-RoPE position and the
question after the image at the unpruned position, exactly as the plugin feeds llama.cpp.

Besides the answer loss (assistant tokens), a per-token auxiliary loss (heads dropped on export) makes every
image embedding name the colour and shape under its 14 px cell, whether an object's centre is in it, and the
cell's row and column: the ViT has no absolute position embedding, and the text model's M-RoPE at this head size
(sections 4/6/6 of 16 pairs) resolves columns only coarsely, so the embeddings carry their own place.

Later runs tried --aux-object-weight, --vit-heads 1, --text-rope-theta / --rope-sections, --vision-minutes,
--count-weight, --threads 2, --spatial-places, --compare-present, --place-on-objects, --locate-share,
--aux-weight 0.1 and --text-lr-scale 1.0 (benchmarks/results/shapes-qwen-runs/runs.json). The best
(--aux-object-weight 4 --vit-heads 1 --spatial-places) scored 0.683 and 0.690 on test (seeds 0 and 1) against the
bundled 0.630 but keeps far more tokens at tau = pi/4
(training/kept_at_tau.py), so the AVIS row would exceed 0.6x vanilla FLOPs; the bundle is unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avis_llamacpp.kdv import kdv_scores, random_subset, uniform_subset
from avis_llamacpp.prompt import QWEN25VL
from convert.gguf_tensors import read_tensors
from convert.mmproj import VisionDims
from convert.shapes_task import (COLOURS, LETTERS, SHAPES, Question, Scene, compare_question, grid_place,
                                 make_question)
from convert.text_model import CHATML_CHAT_TEMPLATE, TextModelDims
from convert.tokenizer import build_vocab
from training.data import N_MERGES, Tokenizer, task_corpus
from training.qwen_torch import (QwenVLMDims, ShapesQwenVLM, export_weights, image_positions,
                                 permute_rope_norm_to_neox, text_positions)
from training.train_shapes_vlm import Batcher as LlavaBatcher
from training.train_shapes_vlm import finish_run, lr_at, pack_branches, patch_labels, run_parser, start_run
from training.train_shapes_vlm import write_gguf_pair as write_llava_pair
from training.vlm_torch import pixels

IMAGE_SIZE = 224
PATCH = 7
GRID = IMAGE_SIZE // PATCH // 2  # 16 x 16 = 256 image tokens
CELL = IMAGE_SIZE // GRID  # 14 px per image token
SELECTORS = ("kdv", "random", "uniform")


def check_pruning(keep_range: tuple[float, float], selector_probs: tuple[float, ...]) -> None:
    """ValueError unless 0 < low <= high <= 1 and selector_probs are len(SELECTORS) non-negative weights, not all 0."""
    if not 0 < keep_range[0] <= keep_range[1] <= 1:
        raise ValueError(f"keep range must satisfy 0 < low <= high <= 1, got {keep_range}")
    if len(selector_probs) != len(SELECTORS) or min(selector_probs) < 0 or sum(selector_probs) <= 0:
        raise ValueError(f"selector probabilities must be {len(SELECTORS)} non-negative numbers, "
                         f"got {selector_probs}")


def draw_pruning(rng: np.random.Generator, prune_prob: float, n_total: int,
                 keep_range: tuple[float, float] = (0.1, 1.0),
                 selector_probs: tuple[float, ...] = (0.5, 0.25, 0.25)) -> tuple[int, str]:
    """(tokens kept, selector) of one training batch: unpruned ("none") with probability 1 - prune_prob, else a kept
    share uniform in keep_range and a selector drawn from SELECTORS with selector_probs (normalised; check_pruning)."""
    if rng.uniform() >= prune_prob:
        return n_total, "none"
    keep = int(np.clip(round(rng.uniform(*keep_range) * n_total), 1, n_total))
    return keep, str(rng.choice(SELECTORS, p=np.asarray(selector_probs, float) / sum(selector_probs)))
# Text-side count targets (--count-weight): objects of each colour, each shape and each colour-shape pair.
COUNTED: tuple[tuple[str | None, str | None], ...] = (
    tuple((c, None) for c in COLOURS) + tuple((None, s) for s in SHAPES)
    + tuple((c, s) for c in COLOURS for s in SHAPES))
MAX_COUNT = 12  # make_scene draws at most 12 objects
SPATIAL_QUESTION = re.compile(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?")
RUN_TERMS = ("loss", "aux", "question", "count", "n")  # running sums between loss-curve points, and their count


def qwen_vocab():
    """The task vocabulary (same tokens and ids as the llava-style model's) with Qwen's special-token roles."""
    return build_vocab(N_MERGES, family="qwen2vl", corpus=task_corpus())


def default_dims(n_vocab: int, args: argparse.Namespace) -> QwenVLMDims:
    """The architecture trained here."""
    vision = VisionDims("qwen25vl", n_embd=args.vit_embd, n_layer=args.vit_layers, n_head=args.vit_heads,
                        n_ff=args.vit_ff, patch_size=PATCH, image_size=IMAGE_SIZE, proj_dim=args.embd,
                        n_wa_pattern=args.vit_layers)
    sections = getattr(args, "rope_sections", None)  # both optional: older namespaces (tests) lack them
    text = TextModelDims("qwen2vl", n_embd=args.embd, n_layer=args.layers, n_head=args.heads, n_head_kv=args.heads,
                         n_ff=args.ff, n_ctx_train=2048,
                         rope_theta=getattr(args, "text_rope_theta", TextModelDims.rope_theta),
                         rope_sections=tuple(sections) if sections else None)
    return QwenVLMDims(vision, text, n_vocab)


def write_gguf_pair(model: ShapesQwenVLM, out: Path, spec, *, ftype: str = "f32") -> dict:
    """Export the model to out/model.gguf + out/mmproj.gguf."""
    return write_llava_pair(model, out, spec, ftype=ftype, weights=export_weights, chat_template=CHATML_CHAT_TEMPLATE,
                            name="avis-shapes-qwen",
                            description="shapes VLM, Qwen2.5-VL vision tower + merger (trained)")


def init_text_from_llama(model: ShapesQwenVLM, path: str) -> None:
    """Copy a llama-arch shapes text model's weights into the qwen2vl text model (q/k rows to NEOX pairs, biases
    zero)."""
    w = read_tensors(path)
    t = model.text
    sd = {"embd.weight": w["token_embd.weight"], "out_norm.weight": w["output_norm.weight"]}
    n_head = model.dims.text.n_head
    for i in range(model.dims.text.n_layer):
        b = f"blk.{i}."
        sd.update({f"blocks.{i}.attn_norm.weight": w[b + "attn_norm.weight"],
                   f"blocks.{i}.q.weight": permute_rope_norm_to_neox(w[b + "attn_q.weight"], n_head),
                   f"blocks.{i}.k.weight": permute_rope_norm_to_neox(w[b + "attn_k.weight"], n_head),
                   f"blocks.{i}.v.weight": w[b + "attn_v.weight"], f"blocks.{i}.o.weight": w[b + "attn_output.weight"],
                   f"blocks.{i}.ffn_norm.weight": w[b + "ffn_norm.weight"],
                   f"blocks.{i}.gate.weight": w[b + "ffn_gate.weight"], f"blocks.{i}.up.weight": w[b + "ffn_up.weight"],
                   f"blocks.{i}.down.weight": w[b + "ffn_down.weight"]})
        for p in "qkv":
            sd[f"blocks.{i}.{p}.bias"] = np.zeros(t.blocks[i].q.bias.shape if p == "q" else t.blocks[i].k.bias.shape,
                                                  np.float32)
    t.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}, strict=True)


def token_places() -> torch.Tensor:
    """[2, 256] (row, column) of every image token on the 16 x 16 grid, raster order."""
    rows = torch.arange(GRID * GRID)
    return torch.stack((rows // GRID, rows % GRID))


class AuxHeads(torch.nn.Module):
    """Training-only per-token classifiers on the image embeddings: colour, shape, centre, row, column."""

    def __init__(self, dim: int, object_weight: float = 1.0, place_on_objects: bool = False) -> None:
        super().__init__()
        self.object_weight = object_weight
        self.place_on_objects = place_on_objects
        sizes = (1 + len(COLOURS), 1 + len(SHAPES), 2, GRID, GRID)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in sizes)
        self.register_buffer("place", token_places(), persistent=False)

    def forward(self, img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy; img [B, 256, D], labels [B, 3, 256]. The colour and shape terms weigh tokens on
        an object object_weight times a background token's (most tokens are background, and naming an object's
        shape is what the ViT learns slowest). With place_on_objects the row and column terms count object tokens
        only: background tokens are then not asked to tell their place apart (the text model has it from M-RoPE)."""
        b = img.shape[0]
        targets = torch.cat((labels, self.place[None].expand(b, -1, -1)), dim=1)
        on_object = (labels[:, 0] > 0).flatten().float()
        token_weight = 1.0 + (self.object_weight - 1.0) * on_object
        loss = img.new_zeros(())
        for i, head in enumerate(self.heads):
            ce = F.cross_entropy(head(img).flatten(0, 1).float(), targets[:, i].flatten(), reduction="none")
            if i >= 3 and self.place_on_objects:
                loss = loss + (ce * on_object).sum() / on_object.sum().clamp(min=1.0)
            else:
                loss = loss + (ce * token_weight if i < 2 else ce).mean()
        return loss


def scene_counts(scene: Scene) -> np.ndarray:
    """[len(COUNTED)] objects of each colour, shape and colour-shape pair in the scene, capped at MAX_COUNT."""
    return np.array([min(scene.count(shape=shape, colour=colour), MAX_COUNT) for colour, shape in COUNTED],
                    dtype=np.int64)


class CountHead(torch.nn.Module):
    """Training-only text-side head (not exported): from the hidden state that predicts an answer's first token,
    classify how many objects of each colour, shape and colour-shape pair the image holds. The answer loss alone
    gives counting one token per count question; this asks every question branch to carry the counts."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, len(COUNTED) * (MAX_COUNT + 1))

    def forward(self, hidden: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over branches and counted kinds; hidden [N, D], counts [N, len(COUNTED)]."""
        logits = self.proj(hidden).float().view(-1, len(COUNTED), MAX_COUNT + 1)
        return F.cross_entropy(logits.flatten(0, 1), counts.flatten())


def place_text(cell: tuple[int, int]) -> str:
    """A token-grid cell as the traces spell it: 'row 3, column 12' (spatial places and locate answers alike)."""
    return f"row {cell[0]}, column {cell[1]}"


def spatial_places_think(q: Question, scene: Scene) -> str:
    """A spatial question's trace with each object's token-grid cell spelled out first ("The red circle is at row
    3, column 12. ..."), so the relation follows from two copied places instead of one unseen comparison."""
    m = SPATIAL_QUESTION.fullmatch(q.text)
    if m is None:
        raise ValueError(f"not a spatial question: {q.text!r}")
    places = []
    for name in m.groups():
        o = next(o for o in scene.objects if o.name == name)  # spatial questions name unique objects
        places.append(f"The {name} is at {place_text(grid_place(o, CELL))}.")
    return f"{' '.join(places)} {q.think}"


def locate_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    """'Where is the red circle?' answered with its token-grid cell among four (a training-only curriculum, never in
    the task's splits): practice at finding a named object among the image tokens, the step that spatial, count
    and compare answers all need. Distractors are the other objects' cells, then random ones; None when no
    colour-shape pair is unique in the scene."""
    names = [o.name for o in scene.objects]
    unique = [o for o in scene.objects if names.count(o.name) == 1]
    if not unique:
        return None
    target = unique[int(rng.integers(len(unique)))]
    cell = grid_place(target, CELL)
    others = [c for c in dict.fromkeys(grid_place(o, CELL) for o in scene.objects) if c != cell]
    picks = [others[i] for i in rng.permutation(len(others))[:3]]
    while len(picks) < 3:
        extra = (int(rng.integers(GRID)), int(rng.integers(GRID)))
        if extra != cell and extra not in picks:
            picks.append(extra)
    cells = [cell, *picks]
    cells = [cells[i] for i in rng.permutation(4)]
    return Question("locate", f"Where is the {target.name}?", [place_text(c) for c in cells],
                    LETTERS[cells.index(cell)], f"The {target.name} is at {place_text(cell)}.")


class Batcher(LlavaBatcher):
    """Packed batches as the llava-style trainer's, with 256-token labels, pruning chosen per batch (the kept
    indices once the keys are known, in loss_fn) and 3-D positions. Three training-only curricula: spatial traces
    that name both objects' places (spatial_places), and compare questions whose second colour is in the image
    (a share compare_present of them; the task's own draw leaves it absent most of the time, and models learn to
    answer 'more <first colour>' every time), and a share locate_share of questions replaced by locate ones."""

    def __init__(self, *args, spatial_places: bool = False, compare_present: float = 0.0, locate_share: float = 0.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spatial_places = spatial_places
        self.compare_present = compare_present
        self.locate_share = locate_share

    def question(self, scene: Scene, rng: np.random.Generator) -> Question:
        """The task's question, a compare one redrawn with its second colour present in share compare_present;
        a locate question instead in share locate_share (the task's draw when both are 0)."""
        if self.locate_share > 0 and rng.uniform() < self.locate_share:
            located = locate_question(scene, rng)
            if located is not None:
                return located
        q = make_question(scene, rng)
        if q.kind == "compare" and self.compare_present > 0 and rng.uniform() < self.compare_present:
            return compare_question(scene, rng, second_present=True) or q
        return q

    def target(self, q: Question, scene: Scene) -> list[int]:
        """Assistant tokens; a spatial trace names both places first when spatial_places."""
        if self.spatial_places and q.kind == "spatial":
            q = dataclasses.replace(q, think=spatial_places_think(q, scene))
        return self.tok.target(q)

    def labels(self, scene: Scene) -> np.ndarray:
        """[4, 256]: rows 0-2 the per-token targets on the 16 x 16 token grid (patch_labels), row 3 the scene's
        counts (scene_counts) in its first len(COUNTED) entries, for the text-side count head."""
        counts = np.zeros((1, GRID * GRID), dtype=np.int64)
        counts[0, :len(COUNTED)] = scene_counts(scene)
        return np.concatenate((patch_labels(scene, GRID, CELL), counts))

    def pruning(self) -> tuple[int, str]:
        """(tokens kept per image, selector) for the next batch."""
        return draw_pruning(self.prune_rng, self.prune_prob, GRID * GRID)

    def next(self) -> dict:
        """The next batch."""
        samples = [self.sample(self.next_index + i) for i in range(self.batch)]
        self.next_index += self.batch
        n_keep, selector = self.pruning()
        n_q = max(len(p) for _, p, _ in samples)
        L = max(len(q) + len(t) for _, p, _ in samples for q, t in p)
        p0 = len(self.prefix)
        start = p0 + GRID  # text after the image: p0 + max(nx, ny), pruned or not
        # the rows that predict each branch's first answer token (its question's last token), for CountHead
        ends = [(b, p0 + n_keep + j * L + len(q) - 1) for b, (_, pairs, _) in enumerate(samples)
                for j, (q, _) in enumerate(pairs)]
        labels = torch.from_numpy(np.stack([lab for _, _, lab in samples]))
        return {"answer_start_rows": torch.tensor([b for b, _ in ends]),
                "answer_start_cols": torch.tensor([c for _, c in ends]),
                "px": pixels(np.stack([im for im, _, _ in samples])), "index": self.next_index - self.batch,
                "patch_labels": labels[:, :3], "counts": labels[:, 3, :len(COUNTED)],
                "prefix": torch.tensor([self.prefix] * self.batch), "prefix_pos": text_positions(0, p0),
                "rest_pos": torch.cat([text_positions(start, L)] * n_q), "p0": p0, "n_keep": n_keep,
                "selector": selector, **pack_branches(samples, p0 + n_keep, n_q, L)}


def make_batcher(tok: Tokenizer, args: argparse.Namespace, seed: int) -> Batcher:
    """A run's batcher from its arguments (parsed, or training.json's "args": older records lack the curricula)."""
    return Batcher(tok, args.batch, args.questions, seed, args.prune_prob,
                   spatial_places=getattr(args, "spatial_places", False),
                   compare_present=getattr(args, "compare_present", 0.0),
                   locate_share=getattr(args, "locate_share", 0.0))


def choose_kept(b: dict, keys: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, n_keep] ascending raster indices of the kept image tokens of each image in the batch."""
    n_total, n_keep, sel = keys.shape[1], b["n_keep"], b["selector"]
    rows = []
    for i in range(keys.shape[0]):
        if sel == "none":
            rows.append(np.arange(n_total))
        elif sel == "kdv":
            scores = kdv_scores(keys[i].detach().float().numpy().astype(np.float64))
            rows.append(np.sort(np.argsort(-scores, kind="stable")[:n_keep]))
        elif sel == "random":
            rows.append(random_subset(n_total, n_keep, seed, b["index"] + i))
        else:
            rows.append(uniform_subset(n_total, n_keep))
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def loss_fn(model: ShapesQwenVLM, aux: AuxHeads, b: dict, seed: int, question_loss: bool,
            count_head: CountHead | None = None) -> tuple[torch.Tensor, ...]:
    """(answer cross-entropy, auxiliary per-token loss, question-token cross-entropy (0 unless question_loss),
    text-side count loss (0 without count_head))."""
    img, keys = model.vision(b["px"])
    kept = choose_kept(b, keys, seed)
    n_b = img.shape[0]
    kept_img = torch.gather(img, 1, kept[..., None].expand(-1, -1, img.shape[-1]))
    x = torch.cat([model.text.embd(b["prefix"]), kept_img, model.text.embd(b["rest"])], dim=1)
    img_pos = torch.stack([image_positions(b["p0"], kept[i], GRID) for i in range(n_b)])
    pos = torch.cat([b["prefix_pos"][None].expand(n_b, -1, -1), img_pos, b["rest_pos"][None].expand(n_b, -1, -1)],
                    dim=1)
    h = model.text.hidden(x, pos, b["mask"])
    loss = F.cross_entropy(model.text.logits(h[b["rows"], b["cols"]]).float(), b["labels"])
    q_loss = img.new_zeros(())
    if question_loss:
        q_loss = F.cross_entropy(model.text.logits(h[b["q_rows"], b["q_cols"]]).float(), b["q_labels"])
    count_loss = img.new_zeros(())
    if count_head is not None:
        rows = b["answer_start_rows"]
        count_loss = count_head(h[rows, b["answer_start_cols"]], b["counts"][rows])
    return loss, aux(img, b["patch_labels"]), q_loss, count_loss


def pretrain_vision(model: ShapesQwenVLM, aux: AuxHeads, batcher: Batcher, args: argparse.Namespace) -> list[dict]:
    """The first phase: the vision tower and the auxiliary heads alone on the per-token targets (no text model,
    about a quarter of a joint step), so the joint phase starts from image embeddings that already name colour,
    shape and place; the same warm-up and cosine schedule over --vision-minutes."""
    params = list(model.vision.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW([{"params": [x for x in params if x.dim() >= 2], "weight_decay": 0.05},
                             {"params": [x for x in params if x.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    t0, curve, run, n, step = time.perf_counter(), [], 0.0, 0, 0
    while time.perf_counter() - t0 < args.vision_minutes * 60:
        progress = (time.perf_counter() - t0) / (args.vision_minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args.lr, args.warmup)
        samples = [batcher.sample(batcher.next_index + i) for i in range(args.batch)]
        batcher.next_index += args.batch
        img, _ = model.vision(pixels(np.stack([im for im, _, _ in samples])))
        loss = aux(img, torch.from_numpy(np.stack([lab[:3] for _, _, lab in samples])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run, n, step = run + float(loss.detach()), n + 1, step + 1
        if step % 50 == 0:
            curve.append({"vision_step": step, "aux": round(run / n, 4),
                          "minutes": round((time.perf_counter() - t0) / 60, 2)})
            print(json.dumps(curve[-1]), flush=True)
            run, n = 0.0, 0
    return curve


def main(argv: list[str] | None = None) -> int:
    p = run_parser("training.train_shapes_qwen", __doc__, steps=100000, max_minutes=55.0, heads=4,
                   question_loss=0.5, bf16=False, out="/tmp/shapes-qwen/out")
    p.add_argument("--text-lr-scale", type=float, default=0.5, help="LR factor for the warm-started text model")
    p.add_argument("--vit-embd", type=int, default=32, help="ViT width (small: with 1024 patches per image the "
                   "encoder's share of a query's FLOPs stays near the paper model's, about a quarter)")
    p.add_argument("--vit-heads", type=int, default=2)
    p.add_argument("--vit-ff", type=int, default=128)
    p.add_argument("--vit-layers", type=int, default=3, help="ViT blocks; the last one attends over the whole "
                   "image, the others inside 112 px windows")
    p.add_argument("--aux-object-weight", type=float, default=1.0,
                   help="weight of object tokens against background ones in the auxiliary colour and shape terms")
    p.add_argument("--place-on-objects", action="store_true",
                   help="ask only object tokens' embeddings for their row and column in the auxiliary loss")
    p.add_argument("--text-rope-theta", type=float, default=TextModelDims.rope_theta,
                   help="the text model's RoPE base; M-RoPE gives the w (column) section the lowest frequencies, "
                        "which at base 10000 barely turn across a 16-token row")
    p.add_argument("--rope-sections", type=int, nargs=4, default=None, metavar=("T", "H", "W", "E"),
                   help="M-RoPE rotary pairs per position component (default: Qwen2.5-VL's split of head_dim/2); "
                        "t is constant over an image, so 0 frees its pairs for h and w")
    p.add_argument("--prune-prob", type=float, default=0.5, help="share of batches trained on pruned images")
    p.add_argument("--vision-minutes", type=float, default=0.0,
                   help="first train the vision tower alone on the per-token targets for this long (counted in "
                        "--max-minutes)")
    p.add_argument("--count-weight", type=float, default=0.0,
                   help="weight of a training-only text-side loss: from the hidden state before each answer, "
                        "classify the image's number of objects of each colour, shape and colour-shape pair")
    p.add_argument("--spatial-places", action="store_true",
                   help="train spatial answers with a trace that first names both objects' token-grid cells")
    p.add_argument("--compare-present", type=float, default=0.0,
                   help="share of compare questions redrawn with their second colour in the image")
    p.add_argument("--locate-share", type=float, default=0.0,
                   help="share of training questions replaced by 'Where is the <colour> <shape>?' answered with its "
                        "token-grid cell (practice at finding a named object among the image tokens)")
    p.add_argument("--init-text-from", default=None, help="llama-arch shapes text GGUF to start the text model from")
    args = p.parse_args(argv)
    command = start_run("training.train_shapes_qwen", args, argv)
    spec = qwen_vocab()
    dims = default_dims(spec.n_vocab, args)
    model = ShapesQwenVLM(dims)
    if args.init_text_from:
        init_text_from_llama(model, args.init_text_from)
    n_params = {"vision": sum(x.numel() for x in model.vision.parameters()),
                "text": sum(x.numel() for x in model.text.parameters())}
    print(f"dims: {json.dumps(dims.to_dict())}\nparams: {n_params}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="shapes-qwen-"))
    write_gguf_pair(model, work / "init", spec)
    tok = Tokenizer(work / "init" / "model.gguf", QWEN25VL)
    batcher = make_batcher(tok, args, args.seed)
    print(f"prefix tokens: {len(tok.prefix())}, n_vocab: {spec.n_vocab}, eos: {tok.eos}", flush=True)

    aux = AuxHeads(dims.vision.proj_dim, args.aux_object_weight, args.place_on_objects)
    count_head = CountHead(dims.text.n_embd) if args.count_weight > 0 else None
    text_scale = args.text_lr_scale if args.init_text_from else 1.0
    groups = []
    heads = [(aux, 1.0)] + ([(count_head, 1.0)] if count_head is not None else [])
    for mod, scale in ((model.vision, 1.0), *heads, (model.text, text_scale)):
        named = list(mod.named_parameters())
        groups.append({"params": [x for _, x in named if x.dim() >= 2], "weight_decay": 0.05, "scale": scale})
        groups.append({"params": [x for _, x in named if x.dim() < 2], "weight_decay": 0.0, "scale": scale})
    all_params = [x for g in groups for x in g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    joint_minutes = args.max_minutes - args.vision_minutes
    t_all = time.perf_counter()
    vision_curve = pretrain_vision(model, aux, batcher, args) if args.vision_minutes > 0 else []
    t0 = time.perf_counter()
    curve: list[dict] = []
    run = dict.fromkeys(RUN_TERMS, 0.0)
    step = 0
    for step in range(args.steps):
        progress = max(step / args.steps, (time.perf_counter() - t0) / (joint_minutes * 60))
        lr = lr_at(step, progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        batch = batcher.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, aux_loss, q_loss, count_loss = loss_fn(model, aux, batch, args.seed, args.question_loss > 0,
                                                         count_head)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux_loss + args.question_loss * q_loss + args.count_weight * count_loss).backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        run["loss"] += float(loss.detach())
        run["aux"] += float(aux_loss.detach())
        run["question"] += float(q_loss.detach())
        run["count"] += float(count_loss.detach())
        run["n"] += 1
        elapsed = time.perf_counter() - t0
        if args.bench and step + 1 >= args.bench:
            print(f"bench: {elapsed / (step + 1):.3f} s/step, loss {float(loss.detach()):.3f}")
            return 0
        if (step + 1) % 25 == 0:
            curve.append({"step": step + 1, **{k: round(v / run["n"], 4) for k, v in run.items() if k != "n"},
                          "minutes": round(elapsed / 60, 2)})
            print(json.dumps(curve[-1]), flush=True)
            run = dict.fromkeys(RUN_TERMS, 0.0)
        if (step + 1) % 200 == 0:
            torch.save(model.state_dict(), work / "ckpt.pt")
        if elapsed > joint_minutes * 60:
            print(f"time cap reached at step {step + 1}", flush=True)
            break
    train_s = time.perf_counter() - t_all
    torch.save(model.state_dict(), work / "ckpt.pt")
    finish_run(model, write_gguf_pair, spec, args, command=command, steps=step + 1, n_params=n_params,
               train_s=train_s, curve=curve, checkpoint=work / "ckpt.pt", vision_curve=vision_curve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
