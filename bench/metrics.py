"""What the metrics cost on the hot paths, in multiprocess mode (web, worker) and in memory (bridge).

    python bench/metrics.py --calls 200000

Each mode runs in a child process of its own (prometheus_client picks its
value store at import): the cost of one counter `inc`, one labelled counter
`inc` and one histogram `observe`, the operations the publish, fan-out and
delivery paths make, against a loop that does nothing, measured in the same
run. Then the cost of one merged scrape of N processes' files (web's
/metrics with WEB_CONCURRENCY=N). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
from pipeline.core.metrics import FRAMES_SENT, PUBLISHES, PRODUCE_LATENCY
calls = int(sys.argv[1])

def per_call(fn):
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e9

empty = per_call(lambda: None)
print(json.dumps({"empty_loop_ns": round(empty, 1),
                  "counter_inc_ns": round(per_call(FRAMES_SENT.inc) - empty, 1),
                  "labelled_counter_inc_ns": round(per_call(lambda: PUBLISHES.labels("accepted").inc()) - empty, 1),
                  "histogram_observe_ns": round(per_call(lambda: PRODUCE_LATENCY.observe(0.004)) - empty, 1)}))
"""

SCRAPE = """
import json, sys, time
from prometheus_client import generate_latest
from pipeline.core.metrics import scrape_registry
started = time.perf_counter()
rounds = 20
for _ in range(rounds):
    text = generate_latest(scrape_registry())
print(json.dumps({"scrape_ms": round((time.perf_counter() - started) / rounds * 1000, 2), "bytes": len(text)}))
"""


def run(code: str, args: list[str], multiproc_dir: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiproc_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=4, help="processes whose files one scrape merges")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        multiprocess = run(CHILD, [str(args.calls)], directory)
        for _ in range(args.processes - 1):  # more processes' files, as N gunicorn workers leave
            run(CHILD, ["1000"], directory)
        scrape = run(SCRAPE, [], directory)
    in_memory = run(CHILD, [str(args.calls)], None)
    print(json.dumps({"calls": args.calls, "multiprocess": multiprocess, "in_memory": in_memory,
                      "merged_scrape": {"processes": args.processes + 1, **scrape}}))


if __name__ == "__main__":
    main()
