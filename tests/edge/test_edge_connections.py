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
    PERMISSION_DENIED,
    REFLECTION_V1,
    H2Client,
    MappedClient,
    PendingHandshake,
    RawFlood,
    admin_health_serving,
    grpc_frame,
    log_field,
    proto_string_field,
    pump_all,
)

IDLE_TIMEOUT = 2.0
MAX_CONNECTION_AGE = 3.0
MAX_CONNECTIONS = 4
# Below max_connections, as it must be: two identities fill the four.
MAX_CONNECTIONS_PER_CALLER = 2


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


def test_max_connections_holds_a_5th_connection_in_the_backlog_until_one_of_4_closes(launch, accounts):
    credgate = launch({"max_connections": MAX_CONNECTIONS, "max_connections_per_caller": MAX_CONNECTIONS_PER_CALLER})
    holders = [
        H2Client(credgate.tls_port, credgate.ca, accounts[name].cert)
        for name in ("hostile", "busy")
        for _ in range(MAX_CONNECTIONS_PER_CALLER)
    ]
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


# ---------------------------------------------------------------------------
# Handshake admission: connections that never start TLS


FLOOD_SECONDS = 10.0
FLOOD_CALL_INTERVAL = 1.0
# A legitimate call on a fresh connection takes milliseconds; under the flood it must still come
# well within this (without the protection calls fail or wait seconds for a handshake slot).
FLOOD_CALL_BOUND = 3.0


@pytest.mark.parametrize(
    "server, flood",
    [
        # The flood of the issue, at the default limits: more than one source address may keep
        # waiting for its ClientHello, so its own oldest connections give way.
        ({}, 600),
        # More silent connections than max_connections (but fewer than one source may keep
        # waiting): the oldest of them gives way to each new connection.
        ({"max_connections": 120, "max_connections_per_caller": 8}, 200),
    ],
    ids=["600-at-the-defaults", "200-over-max_connections-120"],
)
def test_a_flood_of_connections_that_never_start_tls_does_not_keep_a_caller_out(
    launch, accounts, edge_stubs, server, flood
):
    credgate = launch(server)
    outcomes: list[tuple[str, float, str]] = []

    def fresh_call(what: str) -> None:
        """One call on a connection of its own: TCP, mTLS handshake, HTTP/2, the call."""
        client = MappedClient(credgate, accounts["victim"], edge_stubs, own_connection=True)
        start = time.monotonic()
        try:
            if what == "health":
                client.health.Check(client_health_request(), timeout=FLOOD_CALL_BOUND + 2)
            else:
                client.stub.GetPasswordPolicy(client.pb2.GetPasswordPolicyRequest(), timeout=FLOOD_CALL_BOUND + 2)
            outcomes.append((what, time.monotonic() - start, "OK"))
        except Exception as error:  # grpc.RpcError: recorded, asserted below
            outcomes.append((what, time.monotonic() - start, f"{getattr(error, 'code', lambda: error)()}"))
        finally:
            client.close()

    fresh_call("GetPasswordPolicy")  # warm (credentials, policy cache) before the flood
    outcomes.clear()
    with RawFlood(credgate.tls_port, flood) as raw:
        end = time.monotonic() + FLOOD_SECONDS
        i = 0
        while time.monotonic() < end:
            started = time.monotonic()
            fresh_call(("health", "GetPasswordPolicy")[i % 2])
            i += 1
            time.sleep(max(0.0, FLOOD_CALL_INTERVAL - (time.monotonic() - started)))
        reopened = raw.reopened
        flood_errors = raw.errors
    credgate.assert_alive()
    warned = [
        line for line in credgate.process.lines
        if "have not sent a TLS ClientHello" in line
    ]  # fmt: skip
    failed = [o for o in outcomes if o[2] != "OK"]
    slowest = max(t for _, t, _ in outcomes)
    print(
        f"{flood} silent connections for {FLOOD_SECONDS:g}s ({server or 'default limits'}): credgate closed "
        f"{reopened} of them (each re-opened at once); {len(outcomes)} calls on fresh connections, "
        f"slowest {slowest:.3f}s, failed {failed}; eviction warnings {len(warned)}"
    )
    assert not flood_errors, flood_errors
    assert len(outcomes) >= FLOOD_SECONDS / FLOOD_CALL_INTERVAL - 1
    assert not failed, f"{len(failed)} of {len(outcomes)} calls failed during the flood: {failed}"
    assert slowest < FLOOD_CALL_BOUND, f"a call took {slowest:.2f}s during the flood: {outcomes}"
    # The flood was really bigger than what credgate keeps: it had to close silent connections.
    assert reopened >= flood, f"credgate closed only {reopened} of {flood} silent connections"
    assert warned, "no log line says silent connections are being closed"
    assert admin_health_serving(credgate.admin_addr) == "SERVING"


def client_health_request():
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest()


# ---------------------------------------------------------------------------
# Connection budgets per identity


BUDGET_MAX_CONNECTIONS = 24
BUDGET_PER_CALLER = 8
ENHANCE_YOUR_CALM = 0xB


@pytest.mark.parametrize("hog", ["unmapped", "mapped"])
def test_one_certificate_opening_max_connections_connections_leaves_room_for_a_mapped_caller(
    launch, accounts, unmapped_cert, edge_stubs, hog
):
    credgate = launch({"max_connections": BUDGET_MAX_CONNECTIONS, "max_connections_per_caller": BUDGET_PER_CALLER})
    cert = unmapped_cert if hog == "unmapped" else accounts["hostile"].cert
    clients: list[H2Client] = []
    victim = None
    try:
        for _ in range(BUDGET_MAX_CONNECTIONS):
            clients.append(H2Client(credgate.tls_port, credgate.ca, cert, timeout=5))
        pump_all(clients, lambda: all(c.settings_at is not None and (c.goaways or c.eof_at) for c in clients), 1.0)
        kept = [c for c in clients if not c.goaways and c.eof_at is None]
        refused = [c for c in clients if c.goaways]
        # The mapped caller, while one certificate holds everything it may.
        victim = MappedClient(credgate, accounts["victim"], edge_stubs, own_connection=True)
        took = victim.change_password(timeout=5)
        still_kept = sum(1 for c in kept if c.eof_at is None)
    finally:
        for c in clients:
            c.close()
        if victim:
            victim.close()
    print(
        f"{hog} certificate: {len(kept)} connections kept, {len(refused)} refused with "
        f"{set((code, data) for c in refused for (_, code, _), data in zip(c.goaways, c.goaway_data))}; "
        f"the mapped caller changed its password in {took:.3f}s"
    )
    assert len(kept) == BUDGET_PER_CALLER == still_kept, (
        f"{len(kept)} connections of one {hog} certificate kept, max_connections_per_caller is {BUDGET_PER_CALLER}"
    )
    assert len(refused) == BUDGET_MAX_CONNECTIONS - BUDGET_PER_CALLER
    for c in refused:
        assert c.goaways[0][1] == ENHANCE_YOUR_CALM and b"max_connections_per_caller" in c.goaway_data[0], (
            c.goaways,
            c.goaway_data,
        )
        assert c.wait(lambda: c.eof_at is not None, 2), "a refused connection was not closed"
    credgate.process.wait_for_json(
        lambda e: log_field(e, "limit") == BUDGET_PER_CALLER and "max_connections_per_caller" in str(log_field(e, "message")),
        timeout=5,
        what="the refusal's log line",
    )


def test_an_unmapped_connection_gets_health_only_and_is_closed_after_its_first_refusal_or_when_idle(
    launch, unmapped_cert
):
    credgate = launch({})
    refused = H2Client(credgate.tls_port, credgate.ca, unmapped_cert)
    idle = H2Client(credgate.tls_port, credgate.ca, unmapped_cert)
    try:
        refused.wait_settings()
        idle.wait_settings()
        health = refused.call(HEALTH_CHECK, b"")
        idle_health = idle.call(HEALTH_CHECK, b"")
        after_health = idle_health.ended_at
        assert not refused.goaways, "a health check must not close an unmapped connection"
        reflection = refused.call(REFLECTION_V1, proto_string_field(7, b""))
        closed = refused.wait(lambda: refused.eof_at is not None, 3)
        pump_all([idle], lambda: idle.eof_at is not None, 5 + 3)
    finally:
        refused.close()
        idle.close()
    idle_goaway = idle.goaways[0][0] if idle.goaways else None
    print(
        f"unmapped: health {health.describe()}; reflection {reflection.describe()}; then GOAWAY {refused.goaways} "
        f"and closed ({refused.eof_how}); idle connection GOAWAY {idle_goaway and round(idle_goaway - after_health, 2)}s "
        f"after its health call"
    )
    assert health.status().code == OK and idle_health.status().code == OK
    assert (reflection.status().code, reflection.status().reason) == (PERMISSION_DENIED, "CALLER_NOT_MAPPED"), (
        reflection.describe()
    )
    assert refused.goaways and closed, "the unmapped connection stayed open after a refused call"
    assert idle_goaway is not None and 4.0 <= idle_goaway - after_health <= 5 + 2, (
        f"an idle unmapped connection got its GOAWAY at {idle_goaway and idle_goaway - after_health}s, expected ~5s"
    )
