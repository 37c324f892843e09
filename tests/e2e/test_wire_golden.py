"""Golden wire shapes: what Grafana and the other clients decode, from one
fixed input (go-cpu.pb.gz under fixed labels), compared with the files in
golden/. A change to any shape that Grafana's Pyroscope data source, Profiles
Drilldown or Grafana's Flight SQL data source reads (FlameGraph levels and
names, tree bytes, flamebearer JSON, series points, the SqlInfo rows) fails
here with a diff. After an intended change, regenerate them with
EMBER_UPDATE_GOLDEN=1 and review the diff in version control."""

import base64
import json
import os
import pathlib

import pyarrow.flight as pf
import requests

from conftest import FIXTURES
from test_grafana_flightsql import command
from test_querier import CPU, call, double, i64, ok, s, series_response
from wire import fields, flame_graph_levels, signed

GOLDEN = pathlib.Path(__file__).parent / "golden"
RAW = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
SELECTOR = '{service_name="golden"}'


def check(name, value):
    path = GOLDEN / f"{name}.json"
    text = json.dumps(value, indent=1, sort_keys=True) + "\n"
    if os.environ.get("EMBER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with EMBER_UPDATE_GOLDEN=1"
    assert json.loads(text) == json.loads(path.read_text()), f"{name} differs from {path}"


def push(ember):
    labels = {"__name__": "process_cpu", "service_name": "golden", "pod": "p1"}
    assert ember.push_proto([(labels, [RAW])], tenant="g").status_code == 200


def stats(ember):
    body = ok(call(ember, "GetProfileStats", b"", tenant="g"))
    got = {n: signed(v) for n, _, v in fields(body)}
    return got[2], got[3]


def test_query_api_shapes(ember):
    push(ember)
    oldest, newest = stats(ember)
    body = s(1, CPU) + s(2, SELECTOR) + i64(3, oldest - 60_000) + i64(4, newest + 60_000)
    names, levels, total, max_self = flame_graph_levels(ok(call(ember, "SelectMergeStacktraces", body + i64(5, 40),
                                                          tenant="g")))
    check("select_merge_stacktraces_flamegraph", {"names": names, "levels": levels, "total": total,
                                                  "max_self": max_self})
    tree = next(v for n, _, v in fields(ok(call(ember, "SelectMergeStacktraces", body + i64(5, 40) + i64(6, 2),
                                                tenant="g"))) if n == 2)
    check("select_merge_stacktraces_tree", {"base64": base64.b64encode(tree).decode()})
    series = ok(call(ember, "SelectSeries", body + s(5, "pod") + double(6, 15.0), tenant="g"))
    check("select_series", decode_series(series))


def decode_series(buf):
    return [{"labels": sorted(labels.items()), "points": [[t, v] for t, v in points]}
            for labels, points in series_response(buf)]


def test_render_api_shape(ember):
    push(ember)
    oldest, newest = stats(ember)
    r = requests.get(f"{ember.http}/pyroscope/render", headers={"X-Scope-OrgID": "g"}, timeout=30, params={
        "query": f"{CPU}{SELECTOR}", "from": oldest - 60_000, "until": newest + 60_000,
        "format": "json", "max-nodes": 40})
    assert r.status_code == 200, r.text
    check("render_flamebearer", r.json())


def test_sql_info_rows(ember):
    client = pf.FlightClient(ember.flight)
    options = pf.FlightCallOptions(headers=[(b"x-scope-orgid", b"g")])
    info = client.get_flight_info(pf.FlightDescriptor.for_command(command("CommandGetSqlInfo")), options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    rows = [[n, v] for n, v in zip(table.column("info_name").to_pylist(), table.column("value").to_pylist())]
    # The server's version string changes with every release: its row is
    # checked for presence only.
    rows = [[n, "<version>" if n == 1 else v] for n, v in rows]
    check("sql_info_rows", rows)
