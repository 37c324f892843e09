"""Starts the real `ember` binary on free ports with a temporary data dir."""

import os
import pathlib
import signal
import socket
import subprocess
import time

import adbc_driver_flightsql.dbapi as flightsql
import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("EMBER_BIN", ROOT / "target" / "debug" / "ember"))


def fixtures_dir():
    for candidate in [os.environ.get("EMBER_FIXTURES"), ROOT.parent / "shared" / "fixtures", "/work/shared/fixtures"]:
        if candidate and pathlib.Path(candidate, "pprof").is_dir():
            return pathlib.Path(candidate)
    raise RuntimeError("shared fixtures not found: set EMBER_FIXTURES")


FIXTURES = fixtures_dir()


def flame_stacks(table):
    """Rebuilds 'a;b;c' -> self value from the depth-first flame graph frame:
    (total, stacks, depth)."""
    path, out = [], {}
    rows = table.to_pylist()
    assert rows[0]["level"] == 0 and rows[0]["label"] == "total"
    for r in rows[1:]:
        del path[r["level"] - 1:]
        path.append(r["label"])
        if r["self"]:
            key = ";".join(path)
            out[key] = out.get(key, 0) + r["self"]
    return rows[0]["value"], out, max(r["level"] for r in rows)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ember:
    def __init__(self, data_dir, extra_args=()):
        self.data_dir = data_dir
        self.extra_args = list(extra_args)
        self.proc = None
        self.log = None

    def start(self):
        self.http_port, self.flight_port = free_port(), free_port()
        tls = "--tls-cert" in self.extra_args
        self.http = f"{'https' if tls else 'http'}://127.0.0.1:{self.http_port}"
        self.flight = f"{'grpc+tls' if tls else 'grpc'}://127.0.0.1:{self.flight_port}"
        self.log = open(self.data_dir / "ember.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--data-dir", str(self.data_dir),
             "--http-addr", f"127.0.0.1:{self.http_port}",
             "--flight-addr", f"127.0.0.1:{self.flight_port}", *self.window_args(), *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.proc.poll() is None, "ember exited at start"
            try:
                if requests.get(f"{self.http}/ready", timeout=1, verify=False).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.exceptions.SSLError):
                pass
            time.sleep(0.05)
        raise TimeoutError("ember did not become ready")

    def window_args(self):
        # The recorded fixtures carry the times they were recorded at, years
        # ago: tests replay them with the ingestion window off, except those
        # that set it.
        if any(a.startswith("--reject-older-than") for a in self.extra_args):
            return []
        return ["--reject-older-than-seconds", "0"]

    def kill(self, sig=signal.SIGKILL):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        if self.log:
            self.log.close()

    def alive(self):
        return self.proc.poll() is None

    def sql(self, query, tenant=None, headers=None):
        """Runs a query through ADBC; `headers` go with every call."""
        calls = dict(headers or {})
        if tenant:
            calls["x-scope-orgid"] = tenant
        kwargs = {}
        if calls:
            kwargs["db_kwargs"] = {f"adbc.flight.sql.rpc.call_header.{k}": v for k, v in calls.items()}
        with flightsql.connect(self.flight, autocommit=True, **kwargs) as conn:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetch_arrow_table()

    def push_proto(self, series, tenant=None, gzip_body=True, json=False, timeout=30):
        import base64
        import gzip
        import json as js
        from wire import push_request
        headers = {}
        if tenant:
            headers["X-Scope-OrgID"] = tenant
        if json:
            body = js.dumps({"series": [
                {"labels": [{"name": k, "value": v} for k, v in labels.items()],
                 "samples": [{"rawProfile": base64.b64encode(raw).decode()} for raw in raws]}
                for labels, raws in series]}).encode()
            headers["Content-Type"] = "application/json"
        else:
            body = push_request(series)
            headers["Content-Type"] = "application/proto"
        if gzip_body:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return requests.post(f"{self.http}/push.v1.PusherService/Push", data=body, headers=headers, timeout=timeout)


@pytest.fixture
def ember(tmp_path):
    server = Ember(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def make_ember(tmp_path):
    servers = []

    def make(*args, data_dir=None):
        server = Ember(data_dir or tmp_path, args)
        servers.append(server)
        return server.start()

    yield make
    for s in servers:
        s.stop()
