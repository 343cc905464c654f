"""`l3 loadtest` against `l3 serve` on this machine: one server process, the same requests (a workload's first N
prompt and output lengths) replayed at each concurrency; prints a markdown table of throughput and TTFT/TBT
percentiles as the client measured them.

Usage: python bench/bench_serve.py [--model smollm2] [--backend cpu] [--concurrency 1,4,16] [--requests 32]
       [--workload azure-conv-sample] [--max-batched-tokens N]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--workload", default="azure-conv-sample")
    ap.add_argument("--max-batched-tokens", type=int, help="passed to l3 serve (default: the system's)")
    a = ap.parse_args()
    l3 = str(Path(sys.executable).with_name("l3"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [l3, "serve", "--model", a.model, "--backend", a.backend, "--port", str(port)]
    if a.max_batched_tokens:
        cmd += ["--max-batched-tokens", str(a.max_batched_tokens)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if server.poll() is not None:
                sys.exit(f"l3 serve exited: {server.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for c in a.concurrency.split(","):
                out = Path(tmp) / f"c{c}.json"
                subprocess.run([l3, "loadtest", "--url", url, "--concurrency", c, "--requests", str(a.requests),
                                "--workload", a.workload, "--out", str(out)], check=True,
                               stdout=subprocess.DEVNULL)  # fmt: skip
                rows.append(json.loads(out.read_text()))
    finally:
        server.terminate()
        server.wait(timeout=60)
    r0 = rows[0]
    shown = " ".join(["l3", *cmd[1:6], *cmd[8:]])  # the server's command without its port
    print(f"{shown} on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores); {a.requests} requests of {a.workload} ({r0['prompt_tokens']} prompt and "
          f"{r0['output_tokens']} output tokens; {r0['scaled_to_context']} scaled to the {r0['context']}-token "
          "context), the same requests at each concurrency; measured by the client\n")
    print("| concurrency | completed | wall s | output tok/s | req/s | TTFT p50 / p99 ms | TBT p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t, b = r["ttft_s"], r["tbt_s"]
        print(f"| {r['concurrency']} | {r['completed']}/{r['requests']} | {r['wall_s']:.1f} | "
              f"{r['throughput_tok_s']:.1f} | {r['requests_per_s']:.2f} | "
              f"{t['p50'] * 1e3:.0f} / {t['p99'] * 1e3:.0f} | {b['p50'] * 1e3:.0f} / {b['p99'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
