"""Admin authorization as a pure function: bearer token as bytes (F5), loopback only without one,
and every proxy-forwarding header refused (F11)."""

from __future__ import annotations

import pytest

from pdproxy.admin import FORWARDING_HEADERS, authorize, is_forwarded
from pdproxy.errors import Forbidden, Unauthorized

TOKEN = b"s3cret"


@pytest.mark.parametrize("authorization", ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret "])
def test_the_token_lets_anyone_in(authorization: str) -> None:
    authorize(authorization, TOKEN, "203.0.113.7", {"X-Forwarded-For": "198.51.100.1"})


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2",
    "Bearer \udcff",  # aiohttp's decoding of a non-UTF-8 byte: a surrogate escape
    "Bearer s3cr\udce9t", "Bearer \udcff\udcfe" * 1000, "Bearer \x00", "Bearer s3crét",
])
def test_anything_else_is_a_401_never_a_crash(authorization: str | None) -> None:
    with pytest.raises(Unauthorized, match="Bearer <admin token>"):
        authorize(authorization, TOKEN, "127.0.0.1", {})


def test_a_non_ascii_token_matches_the_bytes_sent() -> None:
    token = "clé".encode()
    as_pdproxys_server_decodes_it = token.decode("latin-1")  # one char per byte
    authorize(f"Bearer {as_pdproxys_server_decodes_it}", token, None, {})
    with pytest.raises(Unauthorized):
        authorize("Bearer clé", token, None, {})  # é as one char is the byte 0xe9, not what the token holds


@pytest.mark.parametrize("remote", ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"])
def test_without_a_token_loopback_clients_get_in(remote: str) -> None:
    authorize(None, None, remote, {"Host": "localhost", "User-Agent": "curl/8", "Content-Type": "application/json",
                                   "Accept": "*/*", "X-Request-Id": "a1", "Authorization": "Bearer x"})


@pytest.mark.parametrize("remote", [None, "", "10.0.0.1", "192.0.2.10", "::ffff:10.0.0.1", "2001:db8::1",
                                    "not an address"])
def test_without_a_token_other_clients_are_refused(remote: str | None) -> None:
    with pytest.raises(Forbidden, match="loopback"):
        authorize(None, None, remote, {})


# The probe's list (F11) and the families around it.
FORWARDED = ["Via", "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP",
             "X-Client-IP", "True-Client-IP", "CF-Connecting-IP", "CF-Connecting-IPv6", "X-Envoy-External-Address",
             "X-Original-Forwarded-For", "X-ProxyUser-Ip", "Fastly-Client-IP", "X-Cluster-Client-IP",
             "X-Envoy-Internal", "X-Envoy-Attempt-Count", "X-Azure-ClientIP", "X-Azure-SocketIP",
             "X-AppEngine-User-IP", "X-Originating-IP", "X-Remote-IP", "X-Forwarded-Anything", "Client-IP",
             "x-real-ip", "X-Some-Vendor-Client-IP", "Akamai-Client-Ip"]


@pytest.mark.parametrize("header", FORWARDED)
def test_every_forwarding_header_is_refused_on_the_tokenless_admin(header: str) -> None:
    assert is_forwarded([header])
    with pytest.raises(Forbidden):
        authorize(None, None, "127.0.0.1", {header: "203.0.113.7"})


@pytest.mark.parametrize("header", ["Host", "User-Agent", "Accept", "Content-Type", "Content-Length",
                                    "Authorization", "X-Request-Id", "X-Membership", "X-Skip", "Connection",
                                    "Accept-Encoding", "Zip"])
def test_ordinary_headers_are_not_forwarding_ones(header: str) -> None:
    assert not is_forwarded([header])


def test_the_documented_list_is_lower_case() -> None:
    assert all(name == name.lower() for name in FORWARDING_HEADERS)
