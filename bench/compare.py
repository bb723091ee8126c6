"""A benchmark beside an earlier commit, in one run: the only comparison this shared machine allows.

    python bench/compare.py --ref 35f2339 -- --stages processing,e2e
    python bench/compare.py --ref HEAD~1 --rounds 3 --script bench/pipeline.py -- --stages processing
    python bench/compare.py --ref 0fac590 --bench-from-head -- --stages overload

The earlier commit is checked out in a temporary git worktree; the benchmark
script (bench/pipeline.py by default, with the arguments after `--`) runs in
each tree in turn, ref then head, for each round, so both meet the same noise.
Each tree runs its own code: the benchmark's stacks start their processes from
their own checkout. A benchmark the ref lacks (a stage, a script) runs there
with `--bench-from-head`: the head's bench/ is copied over the ref's, so both
sides are measured by the same instrument while each runs its own Herald
(pipeline/, tasks/, web/, and tests/harness.py, which starts the processes).
Prints one JSON object: for every number the benchmark printed, the median of
each side and head / ref.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def numbers(tree: dict | list, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON document, by its dotted path."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found: dict[str, float] = {}
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            found[path] = float(value)
        elif isinstance(value, (dict, list)):
            found.update(numbers(value, path))
    return found


def last_json(text: str) -> dict:
    """The last JSON object a benchmark printed (it may print progress before it)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 if start >= 0 else text.index("{"):])


def run(tree: Path, script: str, args: list[str], timeout: float) -> dict[str, float]:
    """One run of the benchmark in `tree`; its numbers."""
    done = subprocess.run([sys.executable, script, *args], cwd=tree, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode:
        raise SystemExit(f"compare: {script} failed in {tree}:\n{done.stderr[-2000:]}")
    return numbers(last_json(done.stdout))


def main() -> None:
    """Run the benchmark at the ref and at the working tree, alternately; print the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the earlier commit (e.g. HEAD~1)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--script", default="bench/pipeline.py", help="the benchmark to run in both trees")
    parser.add_argument("--bench-from-head", action="store_true",
                        help="run the head's bench/ in the ref's tree too (for a benchmark the ref lacks)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the benchmark's own arguments")
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    sha = subprocess.run(["git", "rev-parse", "--short", opts.ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="herald-ref-") as tmp:
        ref_tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(ref_tree), sha], cwd=ROOT, check=True)
        try:
            if opts.bench_from_head:
                shutil.copytree(ROOT / "bench", ref_tree / "bench", dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            runs: dict[str, list[dict[str, float]]] = {"ref": [], "head": []}
            for _ in range(opts.rounds):
                runs["ref"].append(run(ref_tree, opts.script, args, opts.timeout))
                runs["head"].append(run(ROOT, opts.script, args, opts.timeout))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT, check=False)
    keys = sorted(set(runs["ref"][0]) & set(runs["head"][0]))
    table = {}
    for key in keys:
        ref = statistics.median(r[key] for r in runs["ref"] if key in r)
        head = statistics.median(r[key] for r in runs["head"] if key in r)
        table[key] = {"ref": ref, "head": head, "head_over_ref": round(head / ref, 3) if ref else None}
    # A stage the ref's bench/ lacks prints nothing there: say so rather than leave it out quietly.
    head_only = sorted(set(runs["head"][0]) - set(runs["ref"][0]))
    print(json.dumps({"ref": sha, "rounds": opts.rounds, "script": opts.script, "args": args,
                      "bench_from_head": opts.bench_from_head, "figures": table,
                      **({"head_only": head_only} if head_only else {})}, indent=2))


if __name__ == "__main__":
    main()
