"""`saecli autointerp` features explained per minute against a loopback chat server, at 1/4/16 workers,
next to the server's own throughput for the very same requests measured in the same run.

The server is tests/fake_chat.py (an OpenAI-compatible endpoint on 127.0.0.1 answering like a model that
follows the prompts) with a fixed latency per request standing in for generation. saecli's run is the
whole command in this process (`saecli -q autointerp exp.toml --force`: config, analysis, prompts,
retries machinery, parsing, scores, an atomic file per feature); "loop" is the part of it after setup
(the features themselves, from summary.json). The reference replays the exact request bodies saecli sent
with a bare httpx client on the same number of threads and in the same dependency order (a feature's
scorer requests after its explainer request, as they must be), nothing else. Overhead = saecli time /
reference time - 1 (target ≤ 10 %). Repetitions are interleaved; medians are reported.

    python benchmarks/bench_autointerp.py
    python benchmarks/bench_autointerp.py --features 64 --latency 0.05 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_chat import FakeChat  # noqa: E402
from test_autointerp import toy_analysis  # noqa: E402


class RecordingChat(FakeChat):
    """FakeChat that keeps every request body, grouped by feature (to replay them in the same order).

    Each explanation names its feature's prompt (a hash), so the scorer requests can be told apart."""

    def __init__(self, latency: float):
        super().__init__(delay=latency)
        self.groups: dict[str, list[list[dict]]] = {}

    def answer(self, messages):
        if "Find what the marked tokens" in messages[0]["content"]:
            key = hashlib.sha1(messages[1]["content"].encode()).hexdigest()[:12]
            with self.lock:
                self.groups[key] = [messages]
                self.log.append(("explain", 200))
            return 200, json.dumps({"explanation": f"pattern {key}"})
        key = re.search(r"Feature explanation: pattern (\w+)", messages[1]["content"]).group(1)
        with self.lock:
            self.groups[key].append(messages)
        return super().answer(messages)


def run_saecli(exp: Path, summary: Path, workers: int) -> tuple[float, float]:
    """(whole command seconds, loop seconds)."""
    from saecli.cli import main

    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the final tables
            main(["-q", "autointerp", str(exp), "--force", "--set", f"autointerp.max_workers={workers}"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"saecli autointerp exited with {exc.code}") from None
    return time.perf_counter() - t, json.loads(summary.read_text())["this_run"]["seconds"]


def replay(url: str, groups: list[list[list[dict]]], workers: int) -> float:
    import httpx

    client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=workers))
    items = iter(groups)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                group = next(items, None)
            if group is None:
                return
            for messages in group:
                r = client.post(
                    "/chat/completions",
                    json={"model": "fake-model", "messages": messages, "max_tokens": 200, "temperature": 0.0},
                )
                r.raise_for_status()
                json.loads(r.json()["choices"][0]["message"]["content"])

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker) for _ in range(workers)]:
            f.result()
    client.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.1, help="server seconds per request")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-autointerp-"))
    toy_analysis(tmp / "sae", n_features=args.features + 1)
    results: dict[int, dict[str, list[float]]] = {w: {"saecli": [], "loop": [], "server": []} for w in args.workers}
    summary = tmp / "sae" / "analysis" / "default" / "autointerp" / "default" / "summary.json"
    with RecordingChat(args.latency) as server:
        exp = tmp / "exp.toml"
        exp.write_text(
            textwrap.dedent(f"""
            [run]
            output_dir = "{tmp / "sae"}"
            [store]
            backend = "none"
            [autointerp]
            explain_top = 3        # the toy analysis keeps 6 top contexts, 2 per tier, 3 non-activating
            explain_per_tier = 1
            [autointerp.explainer]
            model = "fake-model"
            base_url = "{server.url}"
        """)
        )
        run_saecli(exp, summary, 4)  # warm-up (imports, first connections)
        for _ in range(args.reps):
            for w in args.workers:
                server.groups.clear()
                whole, loop = run_saecli(exp, summary, w)
                results[w]["saecli"].append(whole)
                results[w]["loop"].append(loop)
                groups = list(server.groups.values())
                results[w]["server"].append(replay(server.url, groups, w))
    n_requests = sum(len(g) for g in groups)
    print(
        f"{args.features} features, {n_requests} requests per run ({n_requests / args.features:.1f} per feature), "
        f"server latency {1000 * args.latency:.0f} ms/request, {args.reps} interleaved reps (median [min–max])"
    )
    fpm = lambda t: 60 * args.features / t  # noqa: E731
    span = lambda xs: f"{fpm(statistics.median(xs)):.0f} [{fpm(max(xs)):.0f}–{fpm(min(xs)):.0f}]"  # noqa: E731
    print(
        f"{'workers':>7} | {'saecli command':>16} | {'saecli loop':>16} | {'server alone':>16} | "
        f"overhead command / loop   (features/min)"
    )
    for w in args.workers:
        s, lp, r = results[w]["saecli"], results[w]["loop"], results[w]["server"]
        mr = statistics.median(r)
        print(
            f"{w:>7} | {span(s):>16} | {span(lp):>16} | {span(r):>16} | "
            f"{100 * (statistics.median(s) / mr - 1):5.1f} % / {100 * (statistics.median(lp) / mr - 1):5.1f} %"
        )


if __name__ == "__main__":
    main()
