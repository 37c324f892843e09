"""Starts the real `ember` binary on free ports with a temporary data dir."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

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


class LocalStore:
    """The embedded default: `<data-dir>/objects`."""

    def __init__(self, data_dir):
        self.root = pathlib.Path(data_dir) / "objects"

    def args(self):
        return []

    def keys(self, prefix=""):
        base = self.root / prefix
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()) if base.exists() else []


class S3Store:
    """A bucket of the S3 server the tests run (moto), under a prefix."""

    def __init__(self, endpoint):
        self.endpoint, self.bucket, self.prefix = endpoint, f"ember-{uuid.uuid4().hex[:12]}", "cluster/data"
        requests.put(f"{endpoint}/{self.bucket}", timeout=10).raise_for_status()
        self.options = {"aws_endpoint": endpoint, "aws_allow_http": "true", "aws_region": "us-east-1",
                        "aws_access_key_id": "test-key", "aws_secret_access_key": "test-secret"}

    def url(self):
        return f"s3://{self.bucket}/{self.prefix}"

    def args(self):
        out = ["--object-store-url", self.url()]
        for k, v in self.options.items():
            out += ["--object-store-option", f"{k}={v}"]
        return out

    def keys(self, prefix=""):
        import boto3
        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                          aws_access_key_id="test-key", aws_secret_access_key="test-secret")
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/{prefix}"):
            out += [o["Key"][len(self.prefix) + 1:] for o in page.get("Contents", [])]
        return sorted(out)


class Ember:
    def __init__(self, data_dir, extra_args=(), store=None, env=None):
        self.data_dir = data_dir
        self.extra_args = list(extra_args)
        self.store = store or LocalStore(data_dir)
        self.env = env or {}
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
             "--flight-addr", f"127.0.0.1:{self.flight_port}", *self.window_args(), *self.store.args(),
             *self.extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
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


# The moto_server process behind each endpoint, for tests that stall it.
MOTO_PROCESSES = {}


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A real S3-compatible server on loopback (moto's, from PyPI)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        assert proc.poll() is None, "moto_server exited at start"
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            assert time.time() < deadline, "moto_server did not start"
            time.sleep(0.1)
    MOTO_PROCESSES[endpoint] = proc
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(params=["local", "s3"])
def store(request):
    """Each object store a test runs on: None for the local default, else
    a fresh bucket on the test S3 server."""
    if request.param == "local":
        return None
    return S3Store(request.getfixturevalue("moto"))


@pytest.fixture
def make_ember(tmp_path):
    servers = []

    def make(*args, data_dir=None, store=None, env=None):
        server = Ember(data_dir or tmp_path, args, store=store, env=env)
        servers.append(server)
        return server.start()

    yield make
    for s in servers:
        s.stop()
