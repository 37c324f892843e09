"""A hostile tenant's SQL, through the clients Grafana uses: every statement
gets its answer or a typed error with the reason, the server stays up and
within its memory bound, and what the server announces is what it sends."""

import json
import pathlib
import threading
import time

import pyarrow.flight as pf
import pytest
import requests

from conftest import FIXTURES
from test_trust import NOW_NS, with_time
from wire import push_request

TOKEN = "tok-hostile-0123456789"
# The server's default query memory limit is 1 GiB: a statement may take
# the process to that plus a fixed overhead, never past it.
RSS_BOUND_MB = 1024 + 512


def rss_mb(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples the server's RSS while a block runs."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def __enter__(self):
        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, rss_mb(self.pid))
                time.sleep(0.02)
        self.thread = threading.Thread(target=sample)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.fixture
def guarded(make_ember, tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"tokens": [{"token": TOKEN, "tenant": "hostile"}]}))
    ember = make_ember("--auth-file", str(auth), "--query-timeout-seconds", "5")
    raw = with_time((FIXTURES / "pprof" / "go-heap-large.pb.gz").read_bytes(), NOW_NS())
    r = requests.post(f"{ember.http}/push.v1.PusherService/Push",
                      data=push_request([({"service_name": "api"}, [raw])]),
                      headers={"Content-Type": "application/proto", "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return ember


def sql(ember, query):
    return ember.sql(query, headers={"authorization": f"Bearer {TOKEN}"})


def refused(ember, query):
    with pytest.raises(Exception) as e:
        sql(ember, query)
    return str(e.value)


def test_deep_chains_answer_or_are_refused_and_the_server_stays_up(guarded):
    with PeakRss(guarded.proc.pid) as rss:
        # 1,000 terms killed the process with a stack overflow before.
        assert sql(guarded, "SELECT 1" + "+1" * 1000).column(0)[0].as_py() == 1001
        for terms in [100_000, 2_000]:
            text = refused(guarded, "SELECT 1" + "+1" * terms)
            assert "InvalidArgument" in text or "invalid argument" in text.lower(), text
            assert "nests deeper than 1024 levels" in text, text
        # The shape a Grafana multi-value variable builds.
        values = range(1000)
        by_or = sql(guarded, "SELECT count(*) AS n FROM samples WHERE "
                    + " OR ".join(f"value = {v}" for v in values))
        by_in = sql(guarded, f"SELECT count(*) AS n FROM samples WHERE value IN ({','.join(map(str, values))})")
        assert by_or.to_pylist() == by_in.to_pylist()
        assert by_or.column(0)[0].as_py() > 0
    assert guarded.alive()
    assert rss.peak < RSS_BOUND_MB, rss.peak


def test_thousands_of_subqueries_are_refused_and_the_server_keeps_answering(guarded):
    # Planning grows with the square of the subqueries: 100,000 of them (1 MB
    # of text) would hold a query thread for hours. 127 over a table answer.
    some = "SELECT 1" + " + (SELECT count(*) FROM samples)" * 127
    expected = 1 + 127 * sql(guarded, "SELECT count(*) FROM samples").column(0)[0].as_py()
    assert sql(guarded, some).column(0)[0].as_py() == expected
    for n in [200, 25_000]:
        text = refused(guarded, "SELECT 1 AS one WHERE "
                       + " AND ".join(["(SELECT count(*) FROM samples) >= 0"] * n))
        assert "InvalidArgument" in text or "invalid argument" in text.lower(), text
        assert "more than 256 queries and tables" in text, text
    assert guarded.alive()
    assert sql(guarded, "SELECT 41 + 1 AS n").column(0)[0].as_py() == 42


def test_functions_that_build_huge_outputs_are_refused_within_the_memory_bound(guarded):
    with PeakRss(guarded.proc.pid) as rss:
        for query in ["SELECT cardinality(generate_series(1, 2000000000))",
                      "SELECT length(repeat('x', 1000000000))",
                      "SELECT length(lpad('x', 1000000000))",
                      "SELECT cardinality(array_repeat(0, 1000000000))"]:
            text = refused(guarded, query)
            assert "ResourceExhausted" in text or "resource exhausted" in text.lower(), text
            assert "memory" in text, text
    assert guarded.alive()
    assert rss.peak < RSS_BOUND_MB, rss.peak
    assert sql(guarded, "SELECT length(repeat('x', 1000)) AS n").column(0)[0].as_py() == 1000


def test_a_statement_past_the_timeout_is_a_deadline_with_the_reason(guarded):
    started = time.monotonic()
    text = refused(guarded, "SELECT count(*) FROM generate_series(1, 1000000000000)")
    elapsed = time.monotonic() - started
    assert "DeadlineExceeded" in text or "deadline" in text.lower(), text
    assert "timed out" in text and "memory" not in text, text
    assert elapsed < 5 + 3, elapsed
    assert sql(guarded, "SELECT 1 AS one").column(0)[0].as_py() == 1


def test_the_schema_announced_is_the_schema_streamed(guarded):
    # ADBC's Go client (Grafana's) compares GetFlightInfo's schema with DoGet's.
    assert sql(guarded, "SELECT repeat('x', 3) AS r").to_pylist() == [{"r": "xxx"}]
    assert sql(guarded, "SELECT length(repeat('x', 10)) AS n").column(0)[0].as_py() == 10
    assert sql(guarded, "SELECT generate_series(1, 3) AS s").column(0)[0].as_py() == [1, 2, 3]


def command_descriptor(name):
    """A Flight SQL command with no fields, as an Any, in a descriptor."""
    type_url = f"type.googleapis.com/arrow.flight.protocol.sql.{name}".encode()
    any_message = b"\x0a" + bytes([len(type_url)]) + type_url
    return pf.FlightDescriptor.for_command(any_message)


def test_every_flight_call_but_the_handshake_needs_credentials(guarded):
    client = pf.FlightClient(guarded.flight)
    calls = {
        "ListActions": lambda opts: list(client.list_actions(options=opts)),
        "ListFlights": lambda opts: list(client.list_flights(options=opts)),
    }
    for command in ["CommandGetCatalogs", "CommandGetSqlInfo", "CommandGetTableTypes",
                    "CommandGetDbSchemas", "CommandGetTables", "CommandGetXdbcTypeInfo"]:
        calls[command] = lambda opts, c=command: client.get_flight_info(command_descriptor(c), options=opts)
    bearer = pf.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
    wrong = pf.FlightCallOptions(headers=[(b"authorization", b"Bearer wrong-token-000000")])
    for name, call in calls.items():
        for opts in [pf.FlightCallOptions(), wrong]:
            with pytest.raises(pf.FlightUnauthenticatedError):
                call(opts)
        if name.startswith("Command") or name == "ListActions":
            call(bearer)  # the same call with the token answers
    info = client.get_flight_info(command_descriptor("CommandGetCatalogs"), options=bearer)
    with pytest.raises(pf.FlightUnauthenticatedError):
        client.do_get(info.endpoints[0].ticket).read_all()
    assert client.do_get(info.endpoints[0].ticket, options=bearer).read_all().num_rows == 1


def test_deep_json_and_selectors_on_the_query_api_get_400_with_the_reason(guarded):
    url = f"{guarded.http}/querier.v1.QuerierService"
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    deep = '{"name": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = requests.post(f"{url}/LabelValues", data=deep, headers=auth)
    assert r.status_code == 400, r.text
    assert "recursion limit" in r.json()["message"], r.text
    nested = "(" * 50_000 + "a" + ")" * 50_000
    selector = '{service_name=~"' + nested + '"}'
    r = requests.post(f"{url}/SelectMergeStacktraces", headers=auth, json={
        "profileTypeID": "memory:inuse_space:bytes:space:bytes", "labelSelector": selector,
        "start": 0, "end": 9_999_999_999_999})
    assert r.status_code == 400, r.text
    assert "nest" in r.json()["message"].lower(), r.text
    text = refused(guarded, "SELECT * FROM flamegraph('memory:inuse_space:bytes:space:bytes', "
                            f"'{selector}', 0, 9999999999999)")
    assert "nest" in text.lower(), text
    assert guarded.alive()
