"""What `serve`'s continuous batching (its default) gains when several requests come at once: a bounded local load.

    python -m benchmarks.serve_load --adapter RUN [--clients 8] [--requests 32] [--max_tokens 64] [--out F.json]

Starts `python -m tinyllama_ft serve` on 127.0.0.1 twice, one request after another (`--continuous_batching
false`) and with continuous batching (the default), and sends each the same `--requests` greedy chat requests (real Dolly instructions) from
`--clients` concurrent clients (the OpenAI schema over plain HTTP); reports requests/s, completion tokens/s,
p50/p95 latency, and how many answers are identical between the two servers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tinyllama_ft.bench.compare import bench_dataset

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=1800) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer


def _load(adapter: str, continuous: bool, prompts: list[str], clients: int, max_tokens: int) -> dict:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", "tinyllama_ft", "serve", "--adapter", adapter, "--port", str(port),
                               "--continuous_batching", str(continuous).lower()], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(1200):  # up to 10 minutes to start on a loaded machine
            try:
                model = json.loads(urllib.request.urlopen(f"{base}/models", timeout=5).read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
        body = lambda p: {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,  # noqa: E731
                          "temperature": 0}
        _post(f"{base}/chat/completions", body(prompts[0]))  # warm-up, untimed
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda p: _post(f"{base}/chat/completions", body(p)), prompts))
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results)
    return {"continuous_batching": continuous, "seconds": wall, "requests_per_second": len(prompts) / wall,
            "completion_tokens_per_second": tokens / wall, "completion_tokens": tokens,
            "p50_seconds": statistics.median(latencies), "p95_seconds": latencies[int(0.95 * (len(latencies) - 1))],
            "answers": [r[1]["choices"][0]["message"]["content"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a run folder or a merged export")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--out")
    opts = parser.parse_args()
    rows = [json.loads(line) for line in open(bench_dataset(), encoding="utf-8")]
    prompts = [r["instruction"] for r in rows[: opts.requests]]
    runs = [_load(opts.adapter, cb, prompts, opts.clients, opts.max_tokens) for cb in (False, True)]
    identical = sum(a == b for a, b in zip(runs[0]["answers"], runs[1]["answers"]))
    print(f"serve under {opts.clients} concurrent clients, {opts.requests} greedy requests of up to {opts.max_tokens} "
          f"tokens; load average {open('/proc/loadavg').read().split()[:3]}")
    print(f"{'server':<22}{'req/s':>8}{'tok/s':>9}{'p50 s':>9}{'p95 s':>9}")
    for r in runs:
        name = "continuous batching" if r["continuous_batching"] else "one after another"
        print(f"{name:<22}{r['requests_per_second']:>8.2f}{r['completion_tokens_per_second']:>9.1f}"
              f"{r['p50_seconds']:>9.2f}{r['p95_seconds']:>9.2f}")
    print(f"throughput gain {runs[1]['completion_tokens_per_second'] / runs[0]['completion_tokens_per_second']:.2f}x; "
          f"identical answers: {identical} of {len(prompts)}")
    if opts.out:
        Path(opts.out).write_text(json.dumps({"runs": runs, "identical": identical}, indent=2) + "\n")


if __name__ == "__main__":
    main()
