"""herald.js in Node: message ids are random on every page, never a time or Math.random;
presence() follows the listing's pages (docs/guide.md: "Presence")."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

HERALD_JS = Path(__file__).resolve().parents[2] / "web" / "static" / "herald.js"
NODE = shutil.which("node")
if NODE is None:
    pytest.skip("node is not installed", allow_module_level=True)

# herald.js in Node, as on a plain http:// page: crypto without randomUUID,
# and a Math.random that fails the test if anything asks it for an id.
SCRIPT = """
const source = require("fs").readFileSync(process.argv[1], "utf8");
const getRandomValues = globalThis.crypto.getRandomValues.bind(globalThis.crypto);
Object.defineProperty(globalThis, "crypto", { value: { getRandomValues }, configurable: true });
Math.random = () => { throw new Error("Math.random used for an id"); };
Date.now = () => { throw new Error("the time used for an id"); };
new Function(source)();
const ids = Array.from({ length: 1000 }, () => Herald.newId());
Object.defineProperty(globalThis, "crypto", { value: {}, configurable: true });
let without = null;
try { Herald.newId(); } catch (e) { without = e.message; }
console.log(JSON.stringify({ ids, without }));
"""


def test_ids_on_a_page_without_random_uuid_are_random_uuids():
    done = subprocess.run([NODE, "-e", SCRIPT, str(HERALD_JS)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    ids = answer["ids"]
    assert len(set(ids)) == len(ids)
    for one in ids:
        # RFC 9562 version 4: 122 random bits.
        assert len(one) == 36 and one[14] == "4" and one[19] in "89ab", one
        int(one.replace("-", ""), 16)
    # No source of randomness: no id at all rather than a guessable one.
    assert "getRandomValues" in answer["without"]


# Three pages, as GET presence answers them; fetch records every URL asked for.
PAGES = """
const source = require("fs").readFileSync(process.argv[1], "utf8");
const asked = [];
const pages = { "": { clients: [{ client: "a" }], next: "17" }, "17": { clients: [], next: "42" },
                "42": { clients: [{ client: "b" }, { client: "c" }], next: null } };
globalThis.fetch = (url, options) => {
  asked.push([url, options.headers.Authorization]);
  const cursor = new URL(url, "http://h").searchParams.get("cursor") || "";
  return Promise.resolve({ json: () => Promise.resolve(pages[cursor]) });
};
new Function(source)();
new Herald("ws://h/ws", { token: "t" }).presence("chat:a b").then((body) => {
  console.log(JSON.stringify({ body, asked }));
});
"""


def test_presence_follows_next_through_every_page():
    done = subprocess.run([NODE, "-e", PAGES, str(HERALD_JS)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [c["client"] for c in answer["body"]["clients"]] == ["a", "b", "c"]
    assert answer["body"]["next"] is None
    base = "/api/v1/channels/chat%3Aa%20b/presence"
    assert answer["asked"] == [[base, "Bearer t"], [base + "?cursor=17", "Bearer t"], [base + "?cursor=42", "Bearer t"]]
