"""The Bloom filter of archived message ids: a bitmap in Redis, shared by every process.

An id it has never seen is turned away without a database query (cache
penetration). Bit 0 says the filter is complete: it is set only by a rebuild
from the archive (`flask --app app archive rebuild-bloom`, or the release
step when it is missing). A filter without it, never built or evicted, answers
"maybe" for every id, so a lost filter costs archive reads, never a wrong 404.
"""

from __future__ import annotations

import hashlib
import math

# KEYS: the filter, the filter being rebuilt. ARGV: bit offsets. Sets the
# bits in both, so an id archived during a rebuild is in the rebuilt filter.
_ADD = """
local rebuilding = redis.call('EXISTS', KEYS[2]) == 1
for i = 1, #ARGV do
  redis.call('SETBIT', KEYS[1], ARGV[i], 1)
  if rebuilding then redis.call('SETBIT', KEYS[2], ARGV[i], 1) end
end
return #ARGV
"""


def sizing(capacity: int, error_rate: float) -> tuple[int, int]:
    """(bits, hash functions) of a filter holding `capacity` ids at `error_rate` false positives."""
    bits = math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2)
    return bits, max(1, round(bits / capacity * math.log(2)))


class Bloom:
    """Adds and tests ids on one Redis client (the cache's, HERALD_CACHE_URL)."""

    def __init__(self, client, keys, capacity: int, error_rate: float):
        self.redis = client
        self.key = keys.bloom
        self.next_key = keys.bloom_next
        self.bits, self.hashes = sizing(capacity, error_rate)
        self._add = client.register_script(_ADD)

    def offsets(self, msg_id: str) -> list[int]:
        """The id's bit offsets (double hashing of one 128-bit digest; bit 0 is the built flag)."""
        digest = hashlib.blake2b(msg_id.encode(), digest_size=16).digest()
        h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") | 1
        return [1 + (h1 + i * h2) % self.bits for i in range(self.hashes)]

    def add(self, ids: list[str]) -> None:
        """Add ids in one round trip (raises redis errors)."""
        offsets = [offset for msg_id in ids for offset in self.offsets(msg_id)]
        if offsets:
            self._add(keys=[self.key, self.next_key], args=offsets)

    def might_contain(self, msg_id: str) -> bool:
        """False only when the filter is built and the id was never added."""
        args = ["GET", "u1", 0]
        for offset in self.offsets(msg_id):
            args += ["GET", "u1", offset]
        built, *bits = self.redis.execute_command("BITFIELD_RO", self.key, *args)
        return not built or all(bits)

    def built(self) -> bool:
        """Whether the filter is complete (bit 0)."""
        return bool(self.redis.getbit(self.key, 0))

    def rebuild(self, ids) -> int:
        """Rebuild from an iterable of every archived id; returns how many were added.

        Built apart and renamed over the live filter, so readers use the old
        one until the new one is complete; ids archived meanwhile are added to
        both by `add`.
        """
        self.redis.delete(self.next_key)
        self.redis.setbit(self.next_key, self.bits, 0)  # allocated once, and marks the rebuild for `add`
        count, chunk = 0, []
        for msg_id in ids:
            chunk.append(msg_id)
            if len(chunk) == 5000:
                count += self._set_next(chunk)
                chunk = []
        count += self._set_next(chunk)
        self.redis.setbit(self.next_key, 0, 1)
        self.redis.rename(self.next_key, self.key)
        return count

    def _set_next(self, ids: list[str]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for msg_id in ids:
            args = []
            for offset in self.offsets(msg_id):
                args += ["SET", "u1", offset, 1]
            pipe.execute_command("BITFIELD", self.next_key, *args)
        pipe.execute()
        return len(ids)
