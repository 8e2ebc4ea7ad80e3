"""Train the bundled shapes VLM on CPU and export it as a GGUF pair (text model + mmproj) via convert/.

Reproduce the bundled model (PyTorch 2.13 CPU, one torch thread, one 44-minute run; then evaluation, which fills
in accuracies and parity):

    .venv/bin/pip install torch==2.13.0
    .venv/bin/python -m training.train_shapes_vlm --seed 0 --max-minutes 44 --threads 1 --steps 100000 \
        --copy-weight 1 --question-loss 0.5 --heads 4 --work /tmp/sv --out /tmp/sv/out
    .venv/bin/python -m training.bundle_shapes_vlm /tmp/sv/out avis_llamacpp/data/shapes-vlm
    .venv/bin/python -m training.eval_shapes_vlm --model-dir avis_llamacpp/data/shapes-vlm --n 300 --parity 50
    .venv/bin/python -m convert.shapes_task --split test --n 100 --out avis_llamacpp/data/shapes-test

(The exact command of the bundled run is in avis_llamacpp/data/shapes-vlm/training.json; the same recipe with
--heads 2 reached 39.7%, with --prune-prob 0.5 41%.) The run is
time-capped (the LR schedule anneals by wall clock), so another machine does a different number of steps;
steps_done in training.json records what this run did.

Each step trains on --batch images with --questions questions each. Three training-only signals besides the
answer loss get a 2M-parameter model there in the time budget:
- an auxiliary per-patch loss (heads dropped on export): every image embedding predicts the colour and shape
  under its patch and whether an object's centre lies in it; without it the image embeddings collapsed to a
  near-constant vector;
- a synthetic copy task (--copy-weight): random strings of task tokens shown twice, loss on the repeat; the
  text model needs induction heads to copy the question's words and the options into its reasoning, and from
  the task alone they formed too late (the first bundled model, 62 minutes, still miscopied "bottom-left");
- a language-model loss on the question tokens (--question-loss).
The targets end by checking every option on its own line (convert/shapes_task.py): mapping a free-text
conclusion to its letter was never learned in the time budget (40% letter accuracy given the right reasoning).

The questions of one image share its prefix (BOS, system line, image tokens) inside one packed sequence: each
question branch attends to the prefix and to itself only, at the positions it would have alone, so the loss is
exactly that of separate sequences. Loss is on the assistant tokens (reasoning trace, tagged answer, EOS) only.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from convert.mmproj import VisionDims, write_mmproj_weights
from convert.shapes_task import COLOURS, SHAPES, SPLITS, Question, Scene, make_item, make_question, make_scene, render
from convert.text_model import LLAVA_CHAT_TEMPLATE, TextModelDims, write_text_model_weights
from training.data import Tokenizer, task_vocab
from training.vlm_torch import ShapesVLM, ShapesVLMDims, export_weights, pixels

N_IMAGE_TOKENS = 196
GRID = 14  # 224 / 16


def patch_labels(scene: Scene, grid: int = GRID, cell: int = 16) -> np.ndarray:
    """[3, grid * grid] per-token targets: colour (0 = background), shape (0 = background), object centre in the
    token's cell (cell x cell pixels, raster order)."""
    c = (np.arange(grid) * cell + cell / 2).astype(np.float32)
    cy, cx = np.meshgrid(c, c, indexing="ij")
    out = np.zeros((3, grid * grid), dtype=np.int64)
    if not scene.objects:
        return out
    ox = np.array([o.x for o in scene.objects], np.float32)
    oy = np.array([o.y for o in scene.objects], np.float32)
    orad = np.array([o.r for o in scene.objects], np.float32)
    d = np.hypot(cx.reshape(-1, 1) - ox, cy.reshape(-1, 1) - oy)  # [196, n_obj]
    inside = d < 0.8 * orad
    nearest = np.where(inside, d, np.inf).argmin(1)
    hit = inside.any(1)
    colours, shapes = list(COLOURS), list(SHAPES)
    col = np.array([1 + colours.index(o.colour) for o in scene.objects])
    shp = np.array([1 + shapes.index(o.shape) for o in scene.objects])
    out[0] = np.where(hit, col[nearest], 0)
    out[1] = np.where(hit, shp[nearest], 0)
    centre = (np.clip(oy // cell, 0, grid - 1) * grid + np.clip(ox // cell, 0, grid - 1)).astype(np.int64)
    out[0, centre], out[1, centre], out[2, centre] = col, shp, 1  # small shapes may miss every patch centre
    return out


class AuxHeads(torch.nn.Module):
    """Training-only per-patch classifiers on the projected image embeddings (not exported)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(dim, 1 + len(COLOURS))
        self.shape = torch.nn.Linear(dim, 1 + len(SHAPES))
        self.centre = torch.nn.Linear(dim, 2)

    def forward(self, img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the three per-patch targets; img [B, 196, D], labels [B, 3, 196]."""
        loss = img.new_zeros(())
        for i, head in enumerate((self.colour, self.shape, self.centre)):
            logits = head(img).flatten(0, 1)
            loss = loss + F.cross_entropy(logits.float(), labels[:, i].flatten())
        return loss


def default_dims(n_vocab: int, args: argparse.Namespace) -> ShapesVLMDims:
    """The architecture trained here (CLIP-style ViT, patch 16 -> 196 tokens; small llama)."""
    vision = VisionDims("llava", n_embd=args.vit_embd, n_layer=args.vit_layers + 1, n_head=4, n_ff=4 * args.vit_embd,
                        patch_size=16, image_size=224, proj_dim=args.embd)
    text = TextModelDims("llama", n_embd=args.embd, n_layer=args.layers, n_head=args.heads,
                         n_head_kv=args.heads, n_ff=args.ff, n_ctx_train=2048)
    return ShapesVLMDims(vision, text, n_vocab)


def write_gguf_pair(model: ShapesVLM, out: Path, spec, *, ftype: str = "f32", weights=export_weights,
                    chat_template: str = LLAVA_CHAT_TEMPLATE, name: str = "avis-shapes-vlm",
                    description: str = "shapes VLM vision tower + mlp projector (trained)") -> dict:
    """Export the model (through `weights`: the mirror's export_weights) to out/model.gguf + out/mmproj.gguf."""
    vision_w, text_w = weights(model)
    out.mkdir(parents=True, exist_ok=True)
    ti = write_text_model_weights(out / "model.gguf", model.dims.text, text_w, spec=spec,
                                  chat_template=chat_template, name=name, ftype=ftype)
    vi = write_mmproj_weights(out / "mmproj.gguf", model.dims.vision, vision_w, name=f"{name}-mmproj",
                              description=description, ftype=ftype)
    return {"text": ti, "mmproj": vi}


class Batcher:
    """Packed training batches: per image [prefix | image | q1+t1 | q2+t2 | ...] with a block mask."""

    def __init__(self, tok: Tokenizer, batch: int, questions: int, seed: int, prune_prob: float = 0.0) -> None:
        self.tok = tok
        self.prune_prob = prune_prob
        self.prune_rng = np.random.default_rng([11, seed])
        self.batch = batch
        self.questions = questions
        self.seed = seed
        self.prefix = tok.prefix()
        self.next_index = 0

    def sample(self, index: int) -> tuple[np.ndarray, list[tuple[list[int], list[int]]], np.ndarray]:
        """Image, (question tokens, target tokens) pairs and patch labels of training image `index`."""
        rng = np.random.default_rng([SPLITS["train"], self.seed, index])
        scene = make_scene(rng)
        seen, pairs = set(), []
        for _ in range(self.questions * 3):
            q = self.question(scene, rng)
            if q.text in seen:
                continue
            seen.add(q.text)
            pairs.append((self.tok.question(q), self.target(q, scene)))
            if len(pairs) == self.questions:
                break
        return np.asarray(render(scene)), pairs, self.labels(scene)

    def question(self, scene: Scene, rng: np.random.Generator) -> Question:
        """The next training question about scene (the task's own distribution; subclasses may reweight it)."""
        return make_question(scene, rng)

    def target(self, q: Question, scene: Scene) -> list[int]:
        """Assistant tokens trained for q (the task's own trace; subclasses may spell it out further)."""
        return self.tok.target(q)

    def labels(self, scene: Scene) -> np.ndarray:
        """Per-token auxiliary targets of a scene."""
        return patch_labels(scene)

    def kept_tokens(self, labels: list[np.ndarray]) -> tuple[int, torch.Tensor]:
        """Pruning augmentation: with probability prune_prob the batch keeps n < 196 image tokens per image,
        mostly those on objects (as KDV keeps the diverse ones) plus random others, in their original order and
        at consecutive positions, as llama.cpp feeds a pruned image to a 1-D RoPE model."""
        rng = self.prune_rng
        if rng.uniform() >= self.prune_prob:
            return N_IMAGE_TOKENS, torch.arange(N_IMAGE_TOKENS).expand(len(labels), -1)
        n = int(rng.integers(16, N_IMAGE_TOKENS))
        rows = []
        for lab in labels:
            score = (lab[0] > 0) + rng.uniform(0, 1.5, N_IMAGE_TOKENS)
            rows.append(np.sort(np.argsort(-score)[:n]))
        return n, torch.from_numpy(np.stack(rows))

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch."""
        samples = [self.sample(self.next_index + i) for i in range(self.batch)]
        self.next_index += self.batch
        n_q = max(len(p) for _, p, _ in samples)
        L = max(len(q) + len(t) for _, p, _ in samples for q, t in p)
        p0 = len(self.prefix)
        n_keep, keep = self.kept_tokens([lab for _, _, lab in samples])
        P = p0 + n_keep
        packed = pack_branches(samples, P, n_q, L)
        pos = torch.empty(P + n_q * L, dtype=torch.long)
        pos[:P] = torch.arange(P)
        for j in range(n_q):
            pos[P + j * L:P + (j + 1) * L] = P + torch.arange(L)
        return {"px": pixels(np.stack([im for im, _, _ in samples])),
                "patch_labels": torch.from_numpy(np.stack([lab for _, _, lab in samples])),
                "prefix": torch.tensor([self.prefix] * self.batch), "keep": keep, "pos": pos, **packed}


def pack_branches(samples: list, P: int, n_q: int, L: int) -> dict[str, torch.Tensor]:
    """The question branches of a packed batch after a P-row prefix (text + image): tokens (`rest`, [B, n_q*L]),
    the block mask (each branch sees the prefix and itself, causally) and the loss rows/cols/labels of the
    assistant tokens (`rows`...) and of the question tokens (`q_rows`...)."""
    T = P + n_q * L
    rest = torch.zeros(len(samples), n_q * L, dtype=torch.long)
    rows, cols, labels, q_rows, q_cols, q_labels = [], [], [], [], [], []
    for b, (_, pairs, _) in enumerate(samples):
        for j, (q, t) in enumerate(pairs):
            seq = q + t
            rest[b, j * L:j * L + len(seq)] = torch.tensor(seq)
            for k in range(len(q) - 1, len(seq) - 1):
                rows.append(b)
                cols.append(P + j * L + k)
                labels.append(seq[k + 1])
            for k in range(len(q) - 1):  # the question text itself (options repeat its words: copy practice)
                q_rows.append(b)
                q_cols.append(P + j * L + k)
                q_labels.append(seq[k + 1])
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for j in range(n_q):
        s = P + j * L
        mask[s:s + L, :P] = True
        mask[s:s + L, s:s + L] = causal
    return {"rest": rest, "mask": mask, "rows": torch.tensor(rows), "cols": torch.tensor(cols),
            "labels": torch.tensor(labels), "q_rows": torch.tensor(q_rows), "q_cols": torch.tensor(q_cols),
            "q_labels": torch.tensor(q_labels)}


class CopyTask:
    """Synthetic induction practice for the text model: a random string of task tokens, a random filler, then
    the string again; the loss is on the repeat. The answer needs the same skill (copying the options and the
    question's words into the reasoning), and a small model learns it late from the task alone."""

    def __init__(self, tok: Tokenizer, batch: int, seed: int) -> None:
        pool = {t for i in range(300) for t in tok.question(make_item("train", 10_000_000 + i).question)}
        self.ids = np.array(sorted(pool))
        self.batch = batch
        self.rng = np.random.default_rng([7, seed])

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch: tokens [B, T], positions [T], loss rows/cols/labels."""
        n, gap = int(self.rng.integers(6, 25)), int(self.rng.integers(0, 30))
        x = self.rng.choice(self.ids, size=(self.batch, n))
        filler = self.rng.choice(self.ids, size=(self.batch, gap))
        seq = np.concatenate([x, filler, x], 1)
        s = n + gap
        cols = np.arange(s, s + n - 1)
        start = int(self.rng.integers(0, 300))  # positions as deep as the VLM prompt's question
        return {"tokens": torch.from_numpy(seq), "pos": torch.arange(start, start + seq.shape[1]),
                "rows": torch.arange(self.batch).repeat_interleave(len(cols)),
                "cols": torch.from_numpy(np.tile(cols, self.batch)),
                "labels": torch.from_numpy(seq[:, cols + 1].reshape(-1))}


def copy_loss(model: ShapesVLM, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the repeated half of a CopyTask batch."""
    h = model.text.hidden(model.text.embd(b["tokens"]), b["pos"], None)
    return F.cross_entropy(model.text.logits(h[b["rows"], b["cols"]]).float(), b["labels"])


def loss_fn(model: ShapesVLM, aux: AuxHeads, b: dict[str, torch.Tensor],
            question_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the assistant tokens of a packed batch, auxiliary per-patch loss, mean
    cross-entropy over the question tokens (0 unless question_loss))."""
    img = model.vision(b["px"])
    kept = torch.gather(img, 1, b["keep"][..., None].expand(-1, -1, img.shape[-1]))
    x = model.embed_prompt(b["prefix"], kept, b["rest"])
    h = model.text.hidden(x, b["pos"], b["mask"])
    logits = model.text.logits(h[b["rows"], b["cols"]])
    q_loss = img.new_zeros(())
    if question_loss:
        q_loss = F.cross_entropy(model.text.logits(h[b["q_rows"], b["q_cols"]]).float(), b["q_labels"])
    return F.cross_entropy(logits.float(), b["labels"]), aux(img, b["patch_labels"]), q_loss


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of peak as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_parser(module: str, doc: str | None, *, steps: int, max_minutes: float, heads: int, question_loss: float,
               bf16: bool, out: str) -> argparse.ArgumentParser:
    """A trainer's argument parser with the flags both shapes trainers take (run length, batch, optimiser, text
    model size, losses, threads, output)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--max-minutes", type=float, default=max_minutes,
                   help="stop (and export) after this long; the LR schedule anneals by then")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--questions", type=int, default=4, help="questions per image")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ff", type=int, default=384)
    p.add_argument("--heads", type=int, default=heads, help="text attention heads")
    p.add_argument("--question-loss", type=float, default=question_loss,
                   help="weight of a language-model loss on the question tokens (the options repeat the question's "
                        "words, which teaches the copy heads the answer needs)")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-token auxiliary loss")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=bf16,
                   help="bf16 autocast for the matmuls (weights and optimizer stay f32; slower than f32 on CPUs "
                        "without bf16 matmul units)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: two OpenMP threads spin badly on a shared 2-core machine)")
    p.add_argument("--out", default=out)
    p.add_argument("--work", default=None, help="checkpoint folder (default: a temp dir)")
    p.add_argument("--bench", type=int, default=0, help="only time this many steps and exit")
    return p


def start_run(module: str, args: argparse.Namespace, argv: list[str] | None) -> str:
    """Print and return the run's command line; pin torch's threads and seed."""
    command = f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"command: {command}\nseed: {args.seed}", flush=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return command


def main(argv: list[str] | None = None) -> int:
    p = run_parser("training.train_shapes_vlm", __doc__, steps=2400, max_minutes=30.0, heads=2, question_loss=0.0,
                   bf16=True, out="avis_llamacpp/data/shapes-vlm")
    p.add_argument("--prune-prob", type=float, default=0.0,
                   help="share of batches trained on pruned images (16-195 of 196 tokens kept), so KDV pruning at "
                        "inference is not out of distribution")
    p.add_argument("--copy-weight", type=float, default=0.0, help="weight of the synthetic copy task (0: off)")
    p.add_argument("--copy-batch", type=int, default=16, help="copy-task sequences per step")
    p.add_argument("--vit-embd", type=int, default=128)
    p.add_argument("--vit-layers", type=int, default=4, help="ViT blocks run (the GGUF gets one more, unused)")
    p.add_argument("--init-from", default=None,
                   help="continue from a checkpoint (model weights; fresh optimizer, auxiliary heads and schedule)")
    p.add_argument("--data-offset", type=int, default=0, help="first training image index (use fresh images on resume)")
    args = p.parse_args(argv)
    command = start_run("training.train_shapes_vlm", args, argv)
    spec = task_vocab()
    dims = default_dims(spec.n_vocab, args)
    model = ShapesVLM(dims)
    if args.init_from:
        model.load_state_dict(torch.load(args.init_from))
    n_params = {"vision": sum(p.numel() for p in model.vision.parameters()),
                "text": sum(p.numel() for p in model.text.parameters())}
    print(f"dims: {json.dumps(dims.to_dict())}\nparams: {n_params}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="shapes-vlm-"))
    write_gguf_pair(model, work / "init", spec)  # also the vocabulary llama.cpp tokenizes with
    tok = Tokenizer(work / "init" / "model.gguf")
    batcher = Batcher(tok, args.batch, args.questions, args.seed, args.prune_prob)
    batcher.next_index = args.data_offset
    copier = CopyTask(tok, args.copy_batch, args.seed) if args.copy_weight > 0 else None
    print(f"prefix tokens: {len(tok.prefix())}, n_vocab: {spec.n_vocab}", flush=True)

    aux = AuxHeads(dims.vision.proj_dim)
    params = list(model.named_parameters()) + list(aux.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    curve: list[dict] = []
    run_loss, run_aux, run_q, run_c, run_n = 0.0, 0.0, 0.0, 0.0, 0
    step = 0
    for step in range(args.steps):
        # progress: the larger of the step and the wall-clock fraction, so a time-capped run still anneals
        progress = max(step / args.steps, (time.perf_counter() - t0) / (args.max_minutes * 60))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args.lr, args.warmup)
        batch = batcher.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, aux_loss, q_loss = loss_fn(model, aux, batch, args.question_loss > 0)
            c_loss = copy_loss(model, copier.next()) if copier is not None else loss.new_zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux_loss + args.question_loss * q_loss + args.copy_weight * c_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        run_loss += float(loss.detach())
        run_aux += float(aux_loss.detach())
        run_q += float(q_loss.detach())
        run_c += float(c_loss.detach())
        run_n += 1
        elapsed = time.perf_counter() - t0
        if args.bench and step + 1 >= args.bench:
            print(f"bench: {elapsed / (step + 1):.3f} s/step, loss {float(loss.detach()):.3f}")
            return 0
        if (step + 1) % 25 == 0:
            curve.append({"step": step + 1, "loss": round(run_loss / run_n, 4), "aux": round(run_aux / run_n, 4),
                          "question": round(run_q / run_n, 4), "copy": round(run_c / run_n, 4),
                          "minutes": round(elapsed / 60, 2)})
            print(json.dumps(curve[-1]), flush=True)
            run_loss, run_aux, run_q, run_c, run_n = 0.0, 0.0, 0.0, 0.0, 0
        if (step + 1) % 200 == 0:
            torch.save(model.state_dict(), work / "ckpt.pt")
        if elapsed > args.max_minutes * 60:
            print(f"time cap reached at step {step + 1}", flush=True)
            break
    train_s = time.perf_counter() - t0
    torch.save(model.state_dict(), work / "ckpt.pt")
    torch.save({"aux": aux.state_dict(), "opt": opt.state_dict()}, work / "ckpt_extra.pt")
    finish_run(model, write_gguf_pair, spec, args, command=command, steps=step + 1, n_params=n_params,
               train_s=train_s, curve=curve, checkpoint=work / "ckpt.pt")
    return 0


def finish_run(model, write_pair, spec, args: argparse.Namespace, *, command: str, steps: int, n_params: dict,
               train_s: float, curve: list[dict], checkpoint: Path, **extra) -> dict:
    """Export the model to args.out with write_pair and write its training.json record (command, seed, dims,
    steps, time, loss curve, file sizes, and `extra`); returns the record."""
    out = Path(args.out)
    files = write_pair(model.eval(), out, spec)
    info = {"command": command, "seed": args.seed, "steps_done": steps, "args": vars(args),
            "dims": model.dims.to_dict(), "n_params": n_params, "train_seconds": round(train_s, 1),
            "final_train_loss": curve[-1]["loss"] if curve else None, "loss_curve": curve, **extra,
            "torch": torch.__version__, "threads": args.threads, "checkpoint": str(checkpoint),
            "files": {k: {"bytes": v["file_size"], "n_params": v["n_params"]} for k, v in files.items()}}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    print(f"trained {steps} steps in {train_s / 60:.1f} min; wrote {out}", flush=True)
    return info


if __name__ == "__main__":
    raise SystemExit(main())
