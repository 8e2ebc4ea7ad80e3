"""Which loss terms train the vision tower: the gradient norm each training term sends into the ViT and the text
model, on a train_shapes_qwen run's checkpoint.

    .venv/bin/python -m training.grad_shares --work W --batches 4

The trainer's loss is answer + aux_weight * auxiliary + question_weight * question. Only the answer and question
terms reach the text model; all three reach the ViT, and whichever dominates there decides what the image
embeddings learn. The checkpoint holds the VLM only (the auxiliary heads are not exported), so fresh heads are first
fitted on the frozen embeddings (--fit-steps batches; the printed aux_loss shows how close they come to the
run's own). Prints {"terms": {term: {"vision": norm, "text": norm}}, "aux_loss", "batches"} as JSON, the norms
averaged over --batches training batches drawn from a seed the run did not train on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from avis_llamacpp.prompt import QWEN25VL
from training.data import Tokenizer
from training.qwen_torch import ShapesQwenVLM
from training.train_shapes_qwen import AuxHeads, Batcher, default_dims, loss_fn, make_batcher, qwen_vocab


def _norm(grads) -> float:
    """L2 norm over a list of gradients (None: a parameter the term does not reach)."""
    squares = [(g.double() ** 2).sum() for g in grads if g is not None]
    return float(torch.sqrt(torch.stack(squares).sum())) if squares else 0.0


def term_grad_norms(model: ShapesQwenVLM, aux: AuxHeads, batch: dict, *, aux_weight: float,
                    question_weight: float) -> dict[str, dict[str, float]]:
    """{term: {"vision": L2 norm of the weighted term's gradient over the ViT's parameters, "text": ... over the
    text model's}} for the answer, auxiliary and question terms of one batch."""
    answer, aux_loss, question, _ = loss_fn(model, aux, batch, 0, question_weight > 0)
    terms = {"answer": answer, "aux": aux_weight * aux_loss, "question": question_weight * question}
    vision, text = list(model.vision.parameters()), list(model.text.parameters())
    out: dict[str, dict[str, float]] = {}
    for name, term in terms.items():
        grads = (torch.autograd.grad(term, vision + text, retain_graph=True, allow_unused=True)
                 if term.requires_grad else [None] * (len(vision) + len(text)))
        out[name] = {"vision": _norm(grads[:len(vision)]), "text": _norm(grads[len(vision):])}
    return out


def fit_aux_heads(model: ShapesQwenVLM, aux: AuxHeads, batcher: Batcher, steps: int) -> float:
    """Fit the auxiliary heads on the frozen image embeddings of `steps` batches; returns the last batch's loss."""
    opt = torch.optim.Adam(aux.parameters(), lr=1e-2)
    loss = torch.zeros(())
    for _ in range(steps):
        b = batcher.next()
        with torch.no_grad():
            img, _ = model.vision(b["px"])
        loss = aux(img, b["patch_labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def grad_shares(work: str | Path, batches: int = 4, fit_steps: int = 60, seed: int = 12345) -> dict:
    """term_grad_norms averaged over `batches` batches, for the run in `work` (W/ckpt.pt, W/init, W/out)."""
    torch.manual_seed(seed)  # the fresh auxiliary heads' initialisation
    w = Path(work)
    args = argparse.Namespace(**json.loads((w / "out" / "training.json").read_text())["args"])
    spec = qwen_vocab()
    dims = default_dims(spec.n_vocab, args)
    model = ShapesQwenVLM(dims)
    model.load_state_dict(torch.load(w / "ckpt.pt", map_location="cpu", weights_only=True))
    tok = Tokenizer(w / "init" / "model.gguf", QWEN25VL)
    batcher = make_batcher(tok, args, seed)
    aux = AuxHeads(dims.vision.proj_dim, args.aux_object_weight, getattr(args, "place_on_objects", False))
    aux_loss = fit_aux_heads(model, aux, batcher, fit_steps)
    samples = [term_grad_norms(model, aux, batcher.next(), aux_weight=args.aux_weight,
                               question_weight=args.question_loss) for _ in range(batches)]
    mean = {t: {g: round(sum(s[t][g] for s in samples) / batches, 5) for g in groups}
            for t, groups in samples[0].items()}
    return {"terms": mean, "aux_loss": round(aux_loss, 4), "batches": batches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a train_shapes_qwen --work folder (ckpt.pt, init/, out/)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--fit-steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(grad_shares(a.work, a.batches, a.fit_steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
