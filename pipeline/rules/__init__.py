"""Rules: policies written as data and changed at run time (docs/guide.md: "Rules").

One job a module:
  reading.py     the text to a document (YAML or JSON), within the depth and Unicode bounds; RulesError
  schema.py      the rule set's structure, declared once, and the same as JSON Schema (`json_schema`)
  validation.py  `validate`: a document checked against that structure, every fault with its path;
                 the set in normal form (`load` reads and validates)
  engine.py      `RuleSet`: a valid set compiled once per version; `evaluate` decides for one message
                 (`Decision`, carried on as a `Record`); `redacted`
  dryrun.py      `checked` and `compile_text`: compiled and dry-run before a set is stored or applied
  repository.py  the stored set in Redis: versions, notices, the set a worker has compiled
  step.py        the worker's rules step (evaluate, redact, block, count matches and rate windows) and
                 the side-effect-free `dry_run`

What callers use is here: `from pipeline import rules`, then `rules.load(...)`.
"""

from pipeline.rules.dryrun import checked, compile_text
from pipeline.rules.engine import MATCH_LIMIT, Context, Decision, Record, RuleSet, record_of, redacted
from pipeline.rules.reading import MAX_DEPTH, TOO_DEEP, RulesError, parse
from pipeline.rules.schema import MAX_SET_PROGRAM, json_schema
from pipeline.rules.validation import load, validate

__all__ = ["MATCH_LIMIT", "MAX_DEPTH", "MAX_SET_PROGRAM", "TOO_DEEP", "Context", "Decision", "Record", "RuleSet",
           "RulesError", "checked", "compile_text", "json_schema", "load", "parse", "record_of", "redacted",
           "validate"]
