"""What rules cost: evaluation per message, and a worker's processing throughput with them.

    python bench/rules.py --messages 20000

Evaluation: `RuleSet.evaluate` per message with 1, 10 and 100 rules (each
rule a channel glob, a type and a field test, a tenth of them with a time
range, each action an alert; messages over 50 channels, half of them of the
rules' type, 5% matching: each of those matches the 10 rules of its channel's
namespace at 100 rules, so 0.5 alerts a message). Throughput:
`Processor.run` on batches of 100 messages against a real Redis (its own,
started here), with no rule set and with the 100 rules stored, measured in
the same run; the archive and dead letters are left out (they do not
change with rules). Regexes: microseconds per value of 1000 characters for
a plain `matches` pattern and for a chain of bounded repeats, exponential
for a backtracking engine (RE2 runs both in linear time). Checking: milliseconds to read,
validate, compile and dry-run the 1000-rule set a PUT may send. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# In place of bench/ itself: bench/pipeline.py would hide the `pipeline` package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from devtools import embedded
from pipeline import rules
from pipeline.core.messages import Envelope, new_id
from pipeline.core.settings import Settings
from pipeline.rules.repository import RulesStore
from pipeline.rules.step import RulesStep
from pipeline.store import Store, connect
from tasks.processor import Processor

CHANNELS = 50


def rule_set_text(count: int) -> str:
    """`count` rules of the usual shape."""
    lines = ["rules:"]
    for n in range(count):
        window = ", time_range: ['22:00', '06:00']" if n % 10 == 9 else ""
        lines.append(f"  - {{id: r{n}, priority: {n % 7}, condition: {{channel: 'ns{n % 10}:*', type: payment, "
                     f"field: data.amount, gt: {1000 + n * 10}{window}}}, action: alert}}")
    return "\n".join(lines)


def messages(count: int, offset0: int = 0) -> list[Envelope]:
    """Messages over CHANNELS channels, offsets in order per channel (prev set), mostly not matching."""
    out, last = [], {}
    for n in range(count):
        channel = f"ns{n % 10}:c{n % CHANNELS}"
        offset = offset0 + n
        out.append(Envelope(id=new_id(), channel=channel, type="payment" if n % 2 else "message",
                            data={"amount": 2500 if n % 20 == 1 else 10, "note": "x"}, sender="bench", ts=0,
                            partition=0, offset=offset, prev=last.get(channel)))
        last[channel] = offset
    return out


def evaluation_cost(count: int, sample: list[Envelope]) -> dict:
    """Microseconds per message to evaluate a set of `count` rules."""
    rule_set = rules.RuleSet(rules.load(rule_set_text(count)), 1)
    context = rules.Context(time.time())
    for envelope in sample[:1000]:  # the per-channel index is built once per channel
        rule_set.evaluate(envelope, context)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matched = sum(1 for envelope in sample if rule_set.evaluate(envelope, rules.Context(time.time())))
        best = min(best, time.perf_counter() - start)
    return {"rules": count, "us_per_message": round(best / len(sample) * 1e6, 2),
            "matched_share": round(matched / len(sample), 3)}


def regex_cost() -> dict:
    """Microseconds per 1000-character value of a `matches` test, on RE2."""
    out = {}
    for name, pattern in (("plain", "^[0-9]{4}-[0-9]{4}$"), ("chain", ".{0,16}" * 5 + "X")):
        rule_set = rules.RuleSet(rules.load(f"rule: {{id: r, condition: {{field: data.x, matches: '{pattern}'}}, "
                                                "action: alert}"), 1)
        envelope = Envelope(id="m", channel="c", type="t", data={"x": "a" * 1000}, sender="s", ts=0)
        context = rules.Context(time.time())
        start = time.perf_counter()
        for _ in range(2000):
            rule_set.evaluate(envelope, context)
        out[f"{name}_us_per_value"] = round((time.perf_counter() - start) / 2000 * 1e6, 2)
    return out


def check_cost() -> dict:
    """Milliseconds to read, validate, compile and dry-run a set of 1000 rules (`compile_text`)."""
    text = rule_set_text(1000)
    start = time.perf_counter()
    rules.compile_text(text, "application/yaml", 1)
    return {"rules": 1000, "ms": round((time.perf_counter() - start) * 1e3, 1)}


class _NoArchive:
    def store(self, envelopes):
        pass

    def record_offsets(self, placed):
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(settings, with_rules: bool, count: int, redis_pid: int) -> tuple[float, float]:
    """Messages a second through Processor.run, batches of 100, and the CPU microseconds
    per message of this process and Redis together: on a shared machine the CPU says
    what rules cost when the wall clock cannot."""
    store = Store(connect(settings, 8), settings)
    store.redis.flushdb()
    rules_store = RulesStore(store, settings)
    if with_rules:
        rules_store.put(rules.load(rule_set_text(100)))
    processor = Processor(settings, store, _NoArchive(), None, RulesStep(rules_store) if with_rules else None)
    batch = messages(count)
    start, cpu = time.perf_counter(), time.process_time() + cpu_seconds(redis_pid)
    for first in range(0, count, 100):
        outcome = processor.run(batch[first:first + 100])
        assert not outcome.parked, "messages were parked: the benchmark's offsets are wrong"
    elapsed = time.perf_counter() - start
    cpu = time.process_time() + cpu_seconds(redis_pid) - cpu
    store.redis.close()
    return count / elapsed, cpu / count * 1e6


def main() -> None:
    """Run both measurements and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs of each kind, best kept")
    args = parser.parse_args()
    sample = messages(10000)
    evaluation = [evaluation_cost(n, sample) for n in (1, 10, 100)]
    regexes, checking = regex_cost(), check_cost()
    with tempfile.TemporaryDirectory() as tmp:
        server = embedded.redis_server(embedded.free_port(), str(Path(tmp) / "redis.log")).start()
        try:
            settings = Settings.from_env({"HERALD_AUTH": "off", "HERALD_DEV": "1", "REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
                                          "HERALD_REDIS_PREFIX": "bench"})
            without, with_ = [], []
            for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits both alike
                without.append(throughput(settings, False, args.messages, server.proc.pid))
                with_.append(throughput(settings, True, args.messages, server.proc.pid))
        finally:
            server.stop()
    rate = (max(r for r, _ in without), max(r for r, _ in with_))
    cpu = (min(c for _, c in without), min(c for _, c in with_))
    print(json.dumps({
        "evaluation": evaluation,
        "regexes": regexes,
        "check": checking,
        "throughput": {"messages": args.messages, "no_rules_per_s": round(rate[0]),
                       "rules_100_per_s": round(rate[1]), "ratio": round(rate[1] / rate[0], 3),
                       "cpu_us_per_message_no_rules": round(cpu[0], 1),
                       "cpu_us_per_message_rules_100": round(cpu[1], 1),
                       # CPU bounds a worker's throughput: this ratio is the one to hold to >= 0.9.
                       "cpu_ratio": round(cpu[0] / cpu[1], 3)},
    }))


if __name__ == "__main__":
    main()
