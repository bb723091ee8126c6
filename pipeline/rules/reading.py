"""Reading a rule set's text: YAML or JSON to a document, with the bounds every
document meets before its rules are looked at (nesting depth, text UTF-8 can encode).

Each refusal is a RulesError listing `{"path", "problem"}` for each fault.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from pipeline.core.errors import HeraldError

MAX_DEPTH = 32  # levels of mappings and lists in a rule set document: `not` in `not` ... is refused past it
TOO_DEEP = f"nests deeper than {MAX_DEPTH} levels of mappings and lists"


class RulesError(HeraldError, ValueError):
    """A rule set that cannot be used; `errors` lists `{"path", "problem"}` for each fault."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{e['path']}: {e['problem']}" for e in errors))
        self.errors = errors


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: `22:00` stays the text "22:00" (PyYAML's
    SafeLoader reads it as the integer 1320), so times come out as times.

    Aliases (`*name`, and `<<: *name`) are refused: under 1 KB of them names
    billions of nodes (an alias bomb), and a rule set has no need of them. A
    document nested deeper than MAX_DEPTH is refused as it is read.
    """

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise RulesError([{"path": "", "problem": f"uses an alias (*{self.peek_event().anchor}) at line "
                                                      f"{mark.line + 1}; aliases are not allowed"}])
        if not self.check_event(yaml.MappingStartEvent, yaml.SequenceStartEvent):
            return super().compose_node(parent, index)  # a scalar: no deeper
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RulesError([{"path": "", "problem": TOO_DEEP}])
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def parse(text: str | bytes, media_type: str = "application/yaml") -> Any:
    """The document in `text`, JSON when `media_type` says so, else YAML; RulesError if unreadable."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise RulesError([{"path": "", "problem": "is not UTF-8 text"}]) from None
    try:
        if media_type == "application/json" or media_type.endswith("+json"):
            return json.loads(text)
        return yaml.load(text, Loader=_Loader)
    except RulesError:
        raise
    except RecursionError:
        raise RulesError([{"path": "", "problem": TOO_DEEP}]) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise RulesError([{"path": "", "problem": f"cannot be read: {' '.join(str(exc).split())}"}]) from None


def check_shape(doc: Any) -> None:
    """Refuse a document nested deeper than MAX_DEPTH, or holding text that UTF-8 cannot
    encode (a lone surrogate such as "\\ud800" in a mask would fail every message it
    redacts). Iterative: no depth of input can exhaust the stack here."""
    stack = [(doc, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not utf8(value):
                raise RulesError([{"path": path, "problem": "holds text that is not valid Unicode "
                                                            "(a lone surrogate)"}])
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise RulesError([{"path": path, "problem": TOO_DEEP}])
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not utf8(key):
                    raise RulesError([{"path": path, "problem": "has a key that is not valid Unicode "
                                                                "(a lone surrogate)"}])
                stack.append((item, where, depth + 1))
        else:
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))


def utf8(text: str) -> bool:
    """Whether UTF-8 can encode `text` (a lone surrogate cannot be)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
