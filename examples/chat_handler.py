"""Drop AVIS into existing llama-cpp-python code: one chat handler object, the usual create_chat_completion.

    python examples/chat_handler.py [--model M.gguf --mmproj mmproj.gguf] [--image photo.png]"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_cpp import Llama  # noqa: E402

from avis_llamacpp.chat_handler import AVISChatHandler, request_overrides  # noqa: E402
from avis_llamacpp.defaults import DEMO_IMAGE, default_model_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--image", default=str(DEMO_IMAGE))
    args = p.parse_args()
    model, mmproj = (args.model, args.mmproj) if args.model else default_model_paths()
    # the only change to ordinary llama-cpp-python code: this handler
    llm = Llama(model_path=str(model), chat_handler=AVISChatHandler(clip_model_path=str(mmproj), tau=math.pi / 4),
                n_ctx=4096, verbose=False)
    url = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "How many shapes are in the image?"}]}]
    out = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=24)
    print("K=1:", out["choices"][0]["message"]["content"])
    with request_overrides(k=5, seed=1):  # this request only: five voted rollouts sharing one prefill
        out = llm.create_chat_completion(messages=messages, max_tokens=24)
    print("K=5:", out["choices"][0]["message"]["content"])
    print(json.dumps({k: out["avis"][k] for k in ("k", "votes", "images", "flops_vs_vanilla")}))
    llm.close()


if __name__ == "__main__":
    main()
