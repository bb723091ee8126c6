"""HeraldServer: Herald's server API from your backend (docs/server-api.md), e.g. inside a
Flask view or a Celery task.

Standard library only (urllib.request), no global state: each call is one
request with its own connection, so one instance may be shared by threads.

    from herald_client.server import HeraldServer

    herald = HeraldServer("https://herald.example.com", admin_token)
    herald.disconnect("alice", reason="banned")
    herald.revoke(user="alice")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

from herald_client import HeraldError

MAX_ANSWER_BYTES = 1 << 20  # an answer larger than this is not read whole


class APIError(HeraldError):
    """The server answered with a problem (RFC 9457): its `status`, `title` and `detail` kept,
    and the whole `problem`; status 0 when it did not answer at all."""

    def __init__(self, status: int, title: str, detail: str = "", problem: dict | None = None):
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status, self.title, self.detail, self.problem = status, title, detail, problem or {}


class HeraldServer:
    """The server API of one Herald deployment, called with an admin token."""

    def __init__(self, base_url: str, admin_token: str, timeout: float = 5):
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = timeout

    def disconnect(self, user: str, code: int | None = None, reason: str | None = None) -> dict:
        """Close every socket of `user` on every web process (code 4010 unless given, 4000-4999)."""
        body: dict = {}
        if code is not None:
            body["code"] = code
        if reason is not None:
            body["reason"] = reason
        return self._call("POST", f"/users/{_part(user)}/disconnect", body)

    def subscribe(self, user: str, channel: str, since: str | None = None) -> dict:
        """Subscribe every live socket of `user` to `channel` (replaying after `since` when given)."""
        body = {"channel": channel}
        if since is not None:
            body["since"] = since
        return self._call("POST", f"/users/{_part(user)}/subscriptions", body)

    def unsubscribe(self, user: str, channel: str) -> dict:
        """Unsubscribe every live socket of `user` from `channel`."""
        return self._call("DELETE", f"/users/{_part(user)}/subscriptions/{_part(channel)}")

    def revoke(self, jti: str | None = None, *, user: str | None = None, issued_before: float | None = None) -> dict:
        """Revoke the token `jti`, or every token of `user` issued before `issued_before` (default: now)."""
        if (jti is None) == (user is None):
            raise ValueError("give either jti, or user (with an optional issued_before)")
        body: dict = {"jti": jti} if jti is not None else {"user": user}
        if issued_before is not None:
            body["issued_before"] = issued_before
        return self._call("POST", "/revocations", body)

    def channels(self, prefix: str = "", cursor: str | None = None, limit: int = 100) -> dict:
        """A page of active channels starting with `prefix`, with their subscriber counts."""
        query = {"prefix": prefix, "limit": limit}
        if cursor is not None:
            query["cursor"] = cursor
        return self._call("GET", f"/channels?{urlencode(query)}")

    def occupancy(self, channel: str) -> dict:
        """How many are subscribed to `channel` (counts, not the member list)."""
        return self._call("GET", f"/channels/{_part(channel)}/occupancy")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}/api/v1{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.admin_token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read(MAX_ANSWER_BYTES) or b"{}")
        except urllib.error.HTTPError as refused:
            raise _problem(refused) from None
        except (OSError, ValueError) as exc:  # URLError, a timeout, a reset; an answer that is not JSON
            raise APIError(0, "No answer", str(exc)) from None


def _part(value: str) -> str:
    return quote(value, safe="")


def _problem(refused: urllib.error.HTTPError) -> APIError:
    try:
        problem = json.loads(refused.read(MAX_ANSWER_BYTES))
    except (OSError, ValueError):
        problem = None
    finally:
        refused.close()
    if not isinstance(problem, dict):
        return APIError(refused.code, str(refused.reason or "Error"))
    return APIError(refused.code, str(problem.get("title") or refused.reason), str(problem.get("detail") or ""),
                    problem)
