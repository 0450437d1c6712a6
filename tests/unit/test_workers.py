"""The supervisor's pure parts: the port reservation, per-worker upstream ids, the disagreement answer,
the restart backoff."""

from __future__ import annotations

import socket

import orjson
import pytest

from pdproxy.workers import Answer, RestartBackoff, _disagreement, _local_paths, reserve_port


def listing(*upstreams: tuple[str, str, str]) -> Answer:
    return Answer(200, orjson.dumps({"upstreams": [{"id": i, "role": r, "url": u} for i, r, u in upstreams]}))


def test_an_upstream_id_is_translated_to_each_workers_own() -> None:
    # worker 1 was restarted: it numbered the same upstreams afresh
    lists = [listing(("u1", "prefill", "http://p:1"), ("u3", "decode", "http://d2:1")),
             listing(("u1", "prefill", "http://p:1"), ("u2", "decode", "http://d2:1")),
             Answer(None, b"restarting")]
    assert _local_paths("u3", "force=true", lists) == [
        "/admin/upstreams/u3?force=true", "/admin/upstreams/u2?force=true", "/admin/upstreams/u3?force=true"]


def test_an_unknown_id_is_passed_on_unchanged() -> None:
    lists = [listing(("u1", "prefill", "http://p:1")), listing(("u7", "prefill", "http://p:1"))]
    assert _local_paths("u9", "", lists) == ["/admin/upstreams/u9", "/admin/upstreams/u9"]


def test_the_first_listing_worker_names_the_upstream() -> None:
    lists = [Answer(None, b"restarting"), listing(("u4", "decode", "http://d:1")), listing(("u2", "decode", "http://d:1"))]
    assert _local_paths("u4", "", lists)[1:] == ["/admin/upstreams/u4", "/admin/upstreams/u2"]


def test_disagreement_is_a_502_naming_what_each_worker_said() -> None:
    response = _disagreement("the workers answered differently", [
        Answer(201, b'{"upstream": {}}'),
        Answer(404, orjson.dumps({"error": {"message": "no decode upstream http://d:1"}})),
        Answer(None, b"timed out"),
    ])
    assert response.status == 502
    assert response.body is not None
    error = orjson.loads(response.body)["error"]  # type: ignore[arg-type]
    assert error["type"] == "upstream_error"
    assert error["message"] == ("the workers answered differently (worker 0: 201; worker 1: 404 no decode upstream "
                                "http://d:1; worker 2: no answer (timed out))")


def test_the_reserved_port_is_shared_only_with_reuse_port_sockets() -> None:
    reservation = reserve_port("127.0.0.1", 0)
    port = reservation.getsockname()[1]
    try:
        assert port > 0
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                accepted, _ = worker.accept()  # the listening worker gets it, not the reservation
                accepted.close()
    finally:
        reservation.close()


# ---------------------------------------------------------------- restart backoff


def test_restart_delay_doubles_with_each_quick_failure_up_to_the_cap() -> None:
    backoff = RestartBackoff(base=1.0, cap=30.0, reset_after=60.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(10_000) == 30  # no overflow however long the loop


def test_a_worker_that_stayed_up_starts_again_from_the_base_delay() -> None:
    backoff = RestartBackoff(base=1.0, cap=30.0, reset_after=60.0)
    failures = 0
    for up_for in (0.1, 5.0, 59.9):  # quick failures: counted
        failures = backoff.failures_after(failures, up_for)
    assert failures == 3 and backoff.delay(failures) == 4
    failures = backoff.failures_after(failures, 60.0)  # up for a minute: a fresh start
    assert failures == 1 and backoff.delay(failures) == 1
