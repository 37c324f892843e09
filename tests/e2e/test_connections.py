"""Connections a client holds open cost the server a descriptor each: idle,
slow-header and slow-body sockets are closed at their timeouts, a declared
body over the limit is refused before it is read, and past the connection
bound a client is told why, while an agent's pushes are acknowledged."""

import socket
import threading
import time

import pytest
import requests

from conftest import FIXTURES
from test_trust import NOW_NS, with_time


def connect(ember):
    s = socket.create_connection(("127.0.0.1", ember.http_port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


def closed_by_server(s, within):
    """True once the server closes `s` (EOF or reset), reading what it sent."""
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_slow_and_idle_connections_close_while_an_agent_is_acknowledged(make_ember):
    ember = make_ember("--http-header-read-timeout-seconds", "3",
                       "--http-body-read-timeout-seconds", "3")
    idle = [connect(ember) for _ in range(200)]
    slow_header = [connect(ember) for _ in range(200)]
    slow_body = [connect(ember) for _ in range(200)]
    for s in slow_header:
        s.sendall(b"POST /ingest?name=slow&format=folded HTTP/1.1\r\nHost: x\r\n")
    for s in slow_body:
        s.sendall(b"POST /ingest?name=slow&format=folded HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\nmain")
    stop = threading.Event()

    def drip():
        # One byte a second on every slow socket, as slowloris does.
        while not stop.is_set():
            for s in slow_header + slow_body:
                try:
                    s.send(b"x")
                except OSError:
                    pass
            stop.wait(1)

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
        latencies = []
        for _ in range(8):
            started = time.monotonic()
            r = ember.push_proto([({"service_name": "agent"}, [with_time(raw, NOW_NS())])])
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
            time.sleep(0.5)
        assert max(latencies) < 1.0, latencies
        # Each kind closes at its timeout (3 s, the body's counted from its head).
        for group in [idle, slow_header, slow_body]:
            still_open = [s for s in group if not closed_by_server(s, 8)]
            assert not still_open, f"{len(still_open)} of {len(group)} still open"
    finally:
        stop.set()
        dripper.join()
        for s in idle + slow_header + slow_body:
            s.close()
    assert ember.alive()
    # The slow body was answered with the reason before the close.
    s = connect(ember)
    s.sendall(b"POST /ingest?name=slow&format=folded HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nmain")
    s.settimeout(10)
    answer = b""
    while chunk := s.recv(4096):
        answer += chunk
    assert b"did not arrive within 3s" in answer, answer
    # An idle keep-alive connection closes too, after its request.
    s = connect(ember)
    s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    assert closed_by_server(s, 8)
    # So does one to the Flight SQL port that never speaks.
    f = socket.create_connection(("127.0.0.1", ember.flight_port), timeout=10)
    assert closed_by_server(f, 8)


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(ember):
    s = connect(ember)
    s.sendall(b"POST /push.v1.PusherService/Push HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/proto\r\nContent-Length: 99999999999\r\n\r\n")
    s.settimeout(5)
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"declares 99999999999 bytes, more than the limit of 16777216" in answer, answer


def test_past_the_connection_bound_a_client_is_told_why_and_later_served(make_ember):
    ember = make_ember("--max-connections", "40")
    held = [connect(ember) for _ in range(40)]
    time.sleep(0.5)
    try:
        r = requests.get(f"{ember.http}/ready", timeout=5)
        assert r.status_code == 503, r.text
        assert "--max-connections" in r.json()["message"]
        assert r.headers["retry-after"] == "1"
        # Flight SQL shares the bound.
        with pytest.raises(Exception):
            ember.sql("SELECT 1 AS one")
    finally:
        for s in held:
            s.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        r = requests.get(f"{ember.http}/ready", timeout=5)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200
    metrics = requests.get(f"{ember.http}/metrics", timeout=5).text
    refused = [line for line in metrics.splitlines() if line.startswith("ember_connections_refused_total")]
    assert refused and float(refused[0].split()[-1]) >= 1, refused
    assert ember.sql("SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_a_grpc_message_declared_over_the_limit_is_refused_once_its_prefix_is_in(ember):
    s = connect(ember)
    # The 5-byte prefix declares a 4 GB message; nothing of it follows.
    prefix = b"\x00" + (4_000_000_000).to_bytes(4, "big")
    s.sendall(b"POST /push.v1.PusherService/Push HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"5\r\n" + prefix + b"\r\n")
    s.settimeout(5)
    answer = s.recv(65536)
    assert b"grpc-status: 8" in answer.lower(), answer
    assert b"request body of 4000000000 bytes exceeds the limit of 16777216" in answer, answer
