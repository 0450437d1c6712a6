"""`pdproxy upstreams …`: the admin API from a shell, so operators need no curl."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT = 10.0
COLUMNS = (("ID", "id"), ("ROLE", "role"), ("URL", "url"), ("STATE", "state"), ("WEIGHT", "weight"),
           ("IN-FLIGHT", "in_flight"), ("SERVED", "served"), ("SOURCE", "source"), ("MODELS", "models"),
           ("LAST ERROR", "last_error"),
           ("METADATA ERROR", "meta_error"))  # set: the handoff cannot use it, so it gets no traffic


class AdminClientError(Exception):
    """The call failed; the message says why in one line."""


class AdminClient:
    """A thin synchronous client of `/admin/upstreams`."""

    def __init__(self, admin_url: str, token: str | None) -> None:
        self.base = admin_url.rstrip("/") + "/admin/upstreams"
        self.token = token

    def call(self, method: str, path: str = "", body: Any = None, query: dict[str, str] | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminClientError(f"{method} {url}: {exc.code} {_error_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminClientError(f"cannot reach the admin API at {self.base}: {reason}") from None

    def upstreams(self) -> list[dict[str, Any]]:
        return self.call("GET")["upstreams"]

    def resolve(self, target: list[str]) -> dict[str, Any]:
        """An upstream by id, or by role and url."""
        everything = self.upstreams()
        if len(target) == 1:
            found = [u for u in everything if u["id"] == target[0]]
        elif len(target) == 2:
            role, url = target
            url = url if "://" in url else "http://" + url
            found = [u for u in everything if u["role"] == role and u["url"] == url.rstrip("/")]
        else:
            raise AdminClientError("name an upstream by its id, or by ROLE URL")
        if not found:
            raise AdminClientError(f"no upstream {' '.join(target)} (see `pdproxy upstreams list`)")
        return found[0]


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:200]


def format_table(upstreams: list[dict[str, Any]]) -> str:
    """Aligned columns, one upstream a row."""
    rows = [[title for title, _ in COLUMNS]]
    rows += [[_cell(u.get(key)) for _, key in COLUMNS] for u in upstreams]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def run_command(args: argparse.Namespace) -> str:
    """Run one `pdproxy upstreams` action; returns what to print."""
    client = AdminClient(args.admin_url, args.token)
    if args.action == "list":
        return format_table(client.upstreams())
    if args.action == "add":
        body = {"role": args.role, "url": args.url, "weight": args.weight, "skip_warmup": args.skip_warmup,
                **({"model": args.model} if args.model else {})}
        upstream = client.call("POST", body=body)["upstream"]
        verb = "added" if upstream["created"] else "already present:"
        note = " (traffic after its first good health probe)" if upstream["state"] == "warming" else ""
        return f"{verb} {upstream['role']} {upstream['url']} as {upstream['id']}, {upstream['state']}{note}"
    upstream = client.resolve(args.target)
    if args.action == "remove":
        answer = client.call("DELETE", f"/{upstream['id']}", query={"force": "true"} if args.force else None)
        if answer["removed"]:
            return f"removed {upstream['role']} {upstream['url']}"
        return f"draining {upstream['role']} {upstream['url']}: {answer['message']}"
    drained = args.action == "drain"
    answer = client.call("PATCH", f"/{upstream['id']}", body={"drain": drained})["upstream"]
    return f"{upstream['role']} {upstream['url']} is now {answer['state']}"
