"""Load test of ``tunesmith deploy`` on loopback: 1 client vs 16, then 100 concurrent streams.

The server runs as its own process (``python -m tunesmith deploy``, as a user starts it), on a
free 127.0.0.1 port; the clients are the official ``openai`` package's async client in this
process. Every request streams (``stream_options.include_usage`` gives its token count).

Phases, each bounded in count and time (the whole run stops by itself after --time_limit):
  1. one client, --single requests one after another: tokens/s of a lone client;
  2. 16 clients at once, one request each: total tokens/s, and its ratio to phase 1;
  3. --requests (100) streams at once: errors, requests/s, tokens/s, p50/p99 time to first
     token (the queue holds what the 16 batch slots cannot take yet).

Command (README's demo model; add --adapters mybot=CHECKPOINT to load an adapter):
    PYTHONPATH=src .venv/bin/python bench/serve_load.py --model demo
One JSON line per phase is printed and appended to bench/out/serve_load.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a hash map works, step by step.",
    "Describe a walk through a forest in autumn.",
    "List ten ideas for a weekend project and explain each.",
    "写一段关于春天的短文。",
    "Explain recursion to a child, with an example.",
    "Write a poem about the sea.",
    "How does a compiler turn code into a program? Explain in detail.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunesmith", "deploy", "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--max_concurrent", "16",
           "--max_queue", str(args.requests), "--served_model_name", "base",
           # The run's own time limit bounds it; the server must not cut queued requests
           # sooner on a slow (shared) CPU.
           "--request_timeout", str(args.time_limit)]  # fmt: skip
    if args.adapters:
        cmd += ["--adapters", *args.adapters]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not start in 600 s")


async def one(client, model: str, i: int, max_tokens: int) -> dict:
    """One streamed request: its time to first token, tokens, and error if any."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=max_tokens, stream=True, seed=i, stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # counted, not raised: the load test reports errors
        return {"error": f"{type(e).__name__}: {e}", "ttft": None, "tokens": 0}
    return {"error": None, "ttft": first, "tokens": tokens, "total": time.perf_counter() - start}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


async def phase(client, model: str, name: str, n: int, parallel: int, max_tokens: int) -> dict:
    """``n`` requests, ``parallel`` at a time; summary figures."""
    sem = asyncio.Semaphore(parallel)

    async def limited(i: int) -> dict:
        async with sem:
            return await one(client, model, i, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(n)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    errors = sorted({r["error"] for r in results if r["error"]})
    return {"phase": name, "requests": n, "parallel": parallel, "errors": len(results) - len(ok),
            "error_kinds": errors[:3], "wall_s": round(wall, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(ok) / wall, 3),
            "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3),
            "max_tokens": max_tokens}  # fmt: skip


async def run(args: argparse.Namespace, url: str) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                         timeout=args.time_limit)  # fmt: skip
    model = args.adapters[0].split("=")[0] if args.adapters else "base"
    await one(client, model, 0, 4)  # warm-up
    out = [await phase(client, model, "1 client", args.single, 1, args.max_tokens)]
    print(json.dumps(out[-1]), flush=True)  # each phase at once: a cut-off run keeps them
    out.append(await phase(client, model, "16 clients", 16, 16, args.max_tokens))
    out[-1]["vs_1_client"] = round(out[-1]["tokens_per_s"] / out[0]["tokens_per_s"], 2)
    print(json.dumps(out[-1]), flush=True)
    out.append(await phase(client, model, f"{args.requests} streams", args.requests,
                           args.requests, args.load_tokens))  # fmt: skip
    await client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--adapters", nargs="*", default=[])
    ap.add_argument("--single", type=int, default=2, help="requests of the 1-client phase")
    ap.add_argument("--max_tokens", type=int, default=32, help="per request, phases 1-2")
    ap.add_argument("--requests", type=int, default=100, help="concurrent streams, phase 3")
    ap.add_argument("--load_tokens", type=int, default=16, help="per request, phase 3")
    ap.add_argument("--time_limit", type=float, default=1500, help="seconds for everything")
    args = ap.parse_args()
    port = free_port()
    proc = start_server(args, port)
    load0 = os.getloadavg()
    try:
        results = asyncio.run(asyncio.wait_for(run(args, f"http://127.0.0.1:{port}"),
                                               args.time_limit))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model,
               "adapters": args.adapters}  # fmt: skip
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    with open(out / "serve_load.jsonl", "a", encoding="utf-8") as f:
        for r in results:
            line = json.dumps(r | {"machine": machine}, ensure_ascii=False)
            print(line)
            f.write(line + "\n")
    if any(r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
