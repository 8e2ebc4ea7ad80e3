"""Shared-prefill self-consistency cost on the bench-size model: end-to-end time for K = 1, 3, 5, 7 rollouts with
(a) stock llama-cpp-python called K times (create_chat_completion re-encodes and re-prefills every call),
(b) AVIS snapshot mode (one prefill, rollouts one after another) and (c) AVIS parallel mode (one prefill, all
rollouts in one batch per step), as ratios measured in one run. Every rollout decodes exactly --tokens tokens
(EOS is banned with a logit bias in stock and stop tokens are not reachable in ours... see note below), so the
modes do the same work.

    .venv/bin/python benchmarks/bench_rollouts.py --family qwen25vl --tokens 64
"""

from __future__ import annotations

import argparse
import base64
import io
import time

from common import bench_fixture, table

import llama_cpp
from llama_cpp import llama_chat_format as lcf

from avis_llamacpp import VLM
from avis_llamacpp.native import SamplingParams

STOCK = {"llava": lcf.Llava15ChatHandler, "qwen25vl": lcf.Qwen25VLChatHandler}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen25vl", choices=["llava", "qwen25vl"])
    p.add_argument("--size", default="bench", choices=["tiny", "bench", "real"],
                   help="fixture size; real: Qwen2.5-VL-3B dimensions, vocab 151,936, Q4_K_M "
                        "(qwen25vl only; written on first use, minutes)")
    p.add_argument("--image-side", type=int, default=None,
                   help="square image side in pixels (default: the encoder's native size, 644 for qwen25vl)")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per rollout")
    p.add_argument("--ks", default="1,3,5,7")
    p.add_argument("--threads", type=int, default=None, help="threads for single-token AND batch decoding (avoid oversubscribing)")
    a = p.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    fx, image = bench_fixture(a.family, a.size, a.image_side)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    q = "Describe the image in detail."
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]}]
    n_ctx = 1024 + max(ks) * a.tokens + 64
    stock = llama_cpp.Llama(model_path=str(fx.model), n_ctx=n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
                            verbose=False,
                            chat_handler=STOCK[a.family](clip_model_path=str(fx.mmproj), verbose=False))
    eos = {str(t): -1e9 for t in range(stock.n_vocab()) if llama_cpp.llama_vocab_is_eog(stock._model.vocab, t)}
    vlm = VLM(fx.model, fx.mmproj, n_ctx=n_ctx, n_threads=a.threads, n_threads_batch=a.threads, n_seq_max=max(8, max(ks)))
    # our side: never stop early either (no EOS can end a rollout: min_tokens via max and a huge stop list is not
    # needed because the random bench model rarely emits EOS; decoded counts are printed to check)

    def run_stock(k: int) -> int:
        n = 0
        for i in range(k):
            out = stock.create_chat_completion(messages=msgs, temperature=0.7, top_p=0.9, top_k=0, min_p=0.0,
                                               seed=i, max_tokens=a.tokens, logit_bias=eos)
            n += out["usage"]["completion_tokens"]
        return n

    def run_ours(k: int, mode: str) -> int:
        sampling = SamplingParams(temperature=0.7, top_p=0.9) if k > 1 else None
        ans = vlm.ask(image, q, k=k, mode=mode, max_tokens=a.tokens, sampling=sampling, seed=1)
        return sum(ans.decode_tokens)

    run_stock(1), run_ours(1, "parallel")  # warm-up
    rows = []
    for k in ks:
        t = {}
        n = {}
        for name, fn in (("stock", lambda: run_stock(k)), ("snapshot", lambda: run_ours(k, "snapshot")),
                         ("parallel", lambda: run_ours(k, "parallel"))):
            t0 = time.perf_counter()
            n[name] = fn()
            t[name] = time.perf_counter() - t0
        rows.append([k, t["stock"], t["snapshot"], t["parallel"], t["stock"] / t["parallel"],
                     t["snapshot"] / t["parallel"], f"{n['stock']}/{n['snapshot']}/{n['parallel']}"])
    print(f"{a.family} {a.size}: {fx.model.stat().st_size / 2**20:.0f} MiB text model, "
          f"{vlm.ask(image, q, max_tokens=1).image_tokens[0]} image tokens, {a.tokens} tokens per rollout, "
          f"flash_attn={vlm.settings.flash_attn!r} (stock: False)\n")
    print(table(["K", "stock xK s", "snapshot s", "parallel s", "stock / parallel", "snapshot / parallel",
                 "tokens decoded (stock/snap/par)"], rows))
    vlm.close()
    stock.close()


if __name__ == "__main__":
    main()
