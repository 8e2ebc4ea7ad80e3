"""GGUF pre-flight cost: avis_llamacpp.preflight.scan_gguf against gguf-py's stock GGUFReader on a file with a
real-size vocabulary (152k tokens, as Qwen2.5-VL's) and a 64 MiB tensor, best of --repeat.

    .venv/bin/python benchmarks/bench_preflight.py --vocab 151936 --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from avis_llamacpp.preflight import scan_gguf


def write_file(path: Path, n_vocab: int) -> None:
    """A llama-arch GGUF with n_vocab tokens and one 4096 x 4096 f32 tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(n_vocab)])
    w.add_tensor("t.weight", np.zeros((4096, 4096), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def best_of(fn, repeat: int) -> float:
    """Fastest of `repeat` calls, seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.gguf"
        write_file(path, args.vocab)
        ours = best_of(lambda: scan_gguf(path), args.repeat)
        stock = best_of(lambda: gguf.GGUFReader(str(path)), args.repeat)
    print("| reader | seconds (best of %d) | ratio |\n|---|---|---|" % args.repeat)
    print(f"| preflight.scan_gguf | {ours:.3f} | 1.00 |\n| gguf.GGUFReader | {stock:.3f} | {stock / ours:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
