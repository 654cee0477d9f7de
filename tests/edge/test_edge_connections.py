"""Connection lifetimes at credgate's mTLS edge: idle_timeout, max_connection_age,
max_connections, each against its own credgate with short limits, watched by
real TLS + HTTP/2 peers (Python `ssl` + `h2`).
"""

from __future__ import annotations

import time

import pytest

from edge_support import (
    CHANGE_PASSWORD,
    HEALTH_CHECK,
    OK,
    H2Client,
    PendingHandshake,
    admin_health_serving,
    grpc_frame,
    proto_string_field,
    pump_all,
)

IDLE_TIMEOUT = 2.0
MAX_CONNECTION_AGE = 3.0
MAX_CONNECTIONS = 4


@pytest.fixture
def launch(launch_credgate):
    """launch(server_settings): a credgate stopped (and checked alive) at the end of the test."""
    started = []

    def start(server):
        credgate = launch_credgate({"shutdown_grace": "10s", **server})
        started.append(credgate)
        return credgate

    yield start
    for credgate in started:
        try:
            credgate.assert_alive()
        finally:
            credgate.process.stop()


@pytest.fixture
def slow_change_password(edge_emulator, accounts, edge_stubs):
    """send(client, delay) -> stream: a complete ChangePassword of the "busy" caller that IAM answers after delay s."""
    pb2, _ = edge_stubs
    busy = accounts["busy"]
    pending = []

    def send(client: H2Client, delay: float):
        edge_emulator.add_fault(
            {"action": "ChangePassword", "user": busy.iam_user, "delay_seconds": delay, "count": 1}
        )
        new = busy.next_password()
        message = proto_string_field(1, busy.password.encode()) + proto_string_field(2, new.encode())
        stream = client.open_stream(CHANGE_PASSWORD, grpc_frame(message), end=True)
        pending.append((stream, new))
        return stream

    def succeeded(stream) -> bool:
        status = stream.status()
        if not (stream.done and status.code == OK and len(stream.data) > 5):
            return False
        response = pb2.ChangePasswordResponse.FromString(bytes(stream.data[5:]))
        return response.iam_user == busy.iam_user

    send.succeeded = succeeded
    yield send
    for stream, new in pending:
        if succeeded(stream):
            busy.password = new
    edge_emulator.clear_faults()


def since(client: H2Client, t: float | None) -> float | None:
    return None if t is None else round(t - client.connected_at, 2)


def test_an_idle_connection_is_closed_at_idle_timeout_but_not_while_a_request_is_in_flight(
    launch, accounts, unmapped_cert, slow_change_password
):
    credgate = launch({"idle_timeout": f"{IDLE_TIMEOUT:g}s"})
    busy = H2Client(credgate.tls_port, credgate.ca, accounts["busy"].cert)
    idle = H2Client(credgate.tls_port, credgate.ca, unmapped_cert)
    try:
        busy.wait_settings()
        idle.wait_settings()
        call = slow_change_password(busy, 3.0)  # longer than idle_timeout
        pump_all(
            [busy, idle],
            lambda: busy.eof_at is not None and idle.eof_at is not None,
            3.0 + IDLE_TIMEOUT + 6,
        )
    finally:
        busy.close()
        idle.close()
    idle_goaway = idle.goaways[0][0] if idle.goaways else None
    busy_goaway = busy.goaways[0][0] if busy.goaways else None
    print(
        f"idle connection: GOAWAY at {since(idle, idle_goaway)}s {idle.goaways[:1]}, closed ({idle.eof_how}) at "
        f"{since(idle, idle.eof_at)}s; busy connection: call {call.describe()} done at {since(busy, call.ended_at)}s, "
        f"GOAWAY at {since(busy, busy_goaway)}s, closed at {since(busy, busy.eof_at)}s"
    )
    # The idle connection: GOAWAY at about idle_timeout, then the connection ends.
    assert idle_goaway is not None, f"no GOAWAY on a connection idle for {3.0 + IDLE_TIMEOUT + 6}s"
    assert IDLE_TIMEOUT - 0.5 <= idle_goaway - idle.connected_at <= IDLE_TIMEOUT + 2, (
        f"GOAWAY {idle_goaway - idle.connected_at:.2f}s after connecting, idle_timeout is {IDLE_TIMEOUT}s"
    )
    assert idle.eof_at is not None and idle.eof_at - idle_goaway <= 3, "the idle connection was not closed after GOAWAY"
    # The busy connection: its call completes, nothing asks it to go away while the call is in flight.
    assert call.done and slow_change_password.succeeded(call), f"the in-flight call failed: {call.describe()}"
    assert call.ended_at - call.opened >= 2.9, "the emulator's 3 s delay was not applied"
    assert busy_goaway is None or busy_goaway > call.ended_at, (
        f"GOAWAY {busy_goaway - busy.connected_at:.2f}s after connecting, while a call was in flight "
        f"(it ended at {call.ended_at - busy.connected_at:.2f}s): idle_timeout closed a busy connection"
    )
    # Once the call is done, the connection is idle and is closed idle_timeout later.
    assert busy_goaway is not None, "the busy connection was never closed once idle"
    assert IDLE_TIMEOUT - 0.5 <= busy_goaway - call.ended_at <= IDLE_TIMEOUT + 2, (
        f"GOAWAY {busy_goaway - call.ended_at:.2f}s after the last call ended, idle_timeout is {IDLE_TIMEOUT}s"
    )


def test_max_connection_age_sends_goaway_and_an_in_flight_call_still_completes(
    launch, accounts, unmapped_cert, slow_change_password
):
    credgate = launch({"max_connection_age": f"{MAX_CONNECTION_AGE:g}s"})
    busy = H2Client(credgate.tls_port, credgate.ca, accounts["busy"].cert)
    idle = H2Client(credgate.tls_port, credgate.ca, unmapped_cert)
    try:
        busy.wait_settings()
        idle.wait_settings()
        pump_all([busy, idle], lambda: False, 1.0)
        call = slow_change_password(busy, 4.0)  # in flight from age ~1 s to ~5 s
        pump_all(
            [busy, idle],
            lambda: busy.eof_at is not None and idle.eof_at is not None,
            MAX_CONNECTION_AGE + 8,
        )
    finally:
        busy.close()
        idle.close()
    busy_goaway = busy.goaways[0][0] if busy.goaways else None
    idle_goaway = idle.goaways[0][0] if idle.goaways else None
    print(
        f"busy connection: GOAWAYs {[(since(busy, t), code, last) for t, code, last in busy.goaways]}, "
        f"call (stream {call.stream_id}) {call.describe()} done at {since(busy, call.ended_at)}s, closed "
        f"({busy.eof_how}) at {since(busy, busy.eof_at)}s; idle connection: GOAWAY at {since(idle, idle_goaway)}s, "
        f"closed at {since(idle, idle.eof_at)}s"
    )
    assert busy_goaway is not None, f"no GOAWAY within {MAX_CONNECTION_AGE + 8}s (max_connection_age {MAX_CONNECTION_AGE}s)"
    assert MAX_CONNECTION_AGE - 0.5 <= busy_goaway - busy.connected_at <= MAX_CONNECTION_AGE + 1.5, (
        f"GOAWAY at age {busy_goaway - busy.connected_at:.2f}s, max_connection_age is {MAX_CONNECTION_AGE}s"
    )
    assert call.ended_at is None or call.ended_at > busy_goaway, "the call ended before the GOAWAY: not in flight"
    assert call.done and slow_change_password.succeeded(call), (
        f"the call in flight at the GOAWAY did not complete: {call.describe()}"
    )
    assert all(last >= call.stream_id for _, _, last in busy.goaways), (
        f"a GOAWAY's last-stream-id excludes the in-flight stream {call.stream_id}: {busy.goaways}"
    )
    assert busy.eof_at is not None and busy.eof_at >= call.ended_at, "the aged connection was not closed after its call"
    # Busy or not: the idle connection of the same age gets its GOAWAY too.
    assert idle_goaway is not None and abs((idle_goaway - idle.connected_at) - MAX_CONNECTION_AGE) <= 1.5, (
        f"idle connection: GOAWAY at {since(idle, idle_goaway)}s, max_connection_age is {MAX_CONNECTION_AGE}s"
    )


def test_max_connections_holds_a_5th_connection_in_the_backlog_until_one_of_4_closes(launch, accounts, unmapped_cert):
    credgate = launch({"max_connections": MAX_CONNECTIONS})
    holders = [H2Client(credgate.tls_port, credgate.ca, unmapped_cert) for _ in range(MAX_CONNECTIONS)]
    fifth = None
    client = None
    try:
        for h in holders:
            h.wait_settings()
        fifth = PendingHandshake(credgate.tls_port, credgate.ca, accounts["victim"].cert)
        start = time.monotonic()
        completed = fifth.advance(2.0)
        waited = time.monotonic() - start
        health_meanwhile = admin_health_serving(credgate.admin_addr)
        credgate.assert_alive()
        assert not completed, (
            f"a 5th TLS handshake completed in {waited:.2f}s while {MAX_CONNECTIONS} connections were open "
            f"(max_connections = {MAX_CONNECTIONS})"
        )
        assert health_meanwhile == "SERVING", f"admin health while the 5th connection waits: {health_meanwhile}"

        holders[0].close()
        start = time.monotonic()
        completed = fifth.advance(5.0)
        after_close = time.monotonic() - start
        assert completed, "the 5th handshake did not complete within 5 s after one of the 4 connections closed"
        client = H2Client(credgate.tls_port, credgate.ca, accounts["victim"].cert, sock=fifth.ssl)
        client.wait_settings()
        health = client.call(HEALTH_CHECK, b"")
        print(
            f"5th connection: handshake pending after {waited:.2f}s, completed {after_close:.3f}s after a holder "
            f"closed; health on it {health.describe()}; admin health {health_meanwhile}"
        )
        assert health.status().code == OK, health.describe()
    finally:
        for h in holders:
            h.close()
        if client:
            client.close()
        elif fifth:
            fifth.close()
    assert admin_health_serving(credgate.admin_addr) == "SERVING"
    credgate.assert_alive()
