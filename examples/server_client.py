"""Start the llama_cpp server with AVIS on 127.0.0.1 and query it with the official openai client.

    python examples/server_client.py [--model M.gguf --mmproj mmproj.gguf]"""

from __future__ import annotations

import argparse
import base64
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avis_llamacpp.defaults import DEMO_IMAGE, default_model_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    args = p.parse_args()
    model, mmproj = (args.model, args.mmproj) if args.model else default_model_paths()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "avis_llamacpp.server", "--model", str(model),
                               "--clip_model_path", str(mmproj), "--chat_format", "avis", "--n_ctx", "4096",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + args.timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.3)
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
        r = client.chat.completions.create(
            model="avis", max_tokens=24,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "How many shapes are in the image?"}]}],
            extra_body={"avis": {"k": 5, "tau": 0.785, "seed": 3}})
        print(r.choices[0].message.content)
        print({k: r.model_extra["avis"][k] for k in ("k", "votes", "flops_vs_vanilla")})
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
