"""The query API beyond Connect with binary protobuf: Connect with proto3
JSON (what curl users and scripts send) and gRPC on the same port (what
generated stubs send, here Python's grpcio). Each answer is checked against
the binary Connect answer to the same request, which test_querier.py checks
against SQL."""

import json

import grpc
import pytest
import requests

from test_querier import CPU, call, flame_graph, i64, ok, push, s
from wire import fields, flame_graph_levels, load_pprof, folded

SELECTOR = '{service_name="api"}'
END_MS = 2**62 // 10**6


def call_json(ember, method, message, tenant="t"):
    return requests.post(f"{ember.http}/querier.v1.QuerierService/{method}", data=json.dumps(message),
                         headers={"Content-Type": "application/json", "X-Scope-OrgID": tenant}, timeout=30)


def ok_json(r):
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def test_json_flame_graph_is_the_protobuf_one(ember):
    for pod in ["p1", "p2"]:
        push(ember, "t", "api", pod)
    body = s(1, CPU) + s(2, SELECTOR) + i64(3, 0) + i64(4, END_MS) + i64(5, 100000)
    names, levels, total, max_self = flame_graph_levels(ok(call(ember, "SelectMergeStacktraces", body)))
    assert total > 0
    # Pyroscope's JSON names (profileTypeID), 64-bit integers as strings or
    # numbers, and proto field names are all accepted.
    got = ok_json(call_json(ember, "SelectMergeStacktraces", {
        "profile_typeID": CPU, "labelSelector": SELECTOR, "start": "0", "end": str(END_MS), "max_nodes": 100000,
        "format": "PROFILE_FORMAT_FLAMEGRAPH"}))["flamegraph"]
    assert got["names"] == names
    assert [[int(x) for x in level["values"]] for level in got["levels"]] == levels
    assert all(isinstance(x, str) for level in got["levels"] for x in level["values"])
    assert (int(got["total"]), int(got["maxSelf"])) == (total, max_self)
    # TREE bytes come base64-encoded.
    tree = ok_json(call_json(ember, "SelectMergeStacktraces", {
        "profileTypeID": CPU, "labelSelector": SELECTOR, "maxNodes": "100000", "format": 2}))
    proto_tree = next(v for n, _, v in fields(ok(call(ember, "SelectMergeStacktraces", body + i64(6, 2)))) if n == 2)
    import base64
    assert base64.b64decode(tree["tree"]) == proto_tree


def test_json_label_calls_series_and_profile(ember):
    push(ember, "t", "api", "p1")
    push(ember, "t", "web", "p2")
    types = ok_json(call_json(ember, "ProfileTypes", {"start": 1, "end": str(END_MS)}))["profileTypes"]
    cpu = next(t for t in types if t["ID"] == CPU)
    assert (cpu["name"], cpu["sampleType"], cpu["periodUnit"]) == ("process_cpu", "cpu", "nanoseconds")
    values = ok_json(call_json(ember, "LabelValues", {"name": "service_name", "matchers": []}))["names"]
    assert values == ["api", "web"]
    assert ok_json(call_json(ember, "LabelValues", {"name": "service_name"}, tenant="other")) in ({}, {"names": []})

    stats = ok_json(call_json(ember, "GetProfileStats", {}))
    assert stats["dataIngested"] is True
    start, end = int(stats["oldestProfileTime"]) - 60_000, int(stats["newestProfileTime"]) + 60_000
    series = ok_json(call_json(ember, "SelectSeries", {
        "profileTypeID": CPU, "labelSelector": "{}", "start": str(start), "end": end, "step": 15,
        "groupBy": ["service_name"], "aggregation": "TIME_SERIES_AGGREGATION_TYPE_SUM"}))["series"]
    assert sorted(x["labels"][0]["value"] for x in series) == ["api", "web"]
    flame_total = flame_graph(ok(call(ember, "SelectMergeStacktraces", s(1, CPU) + s(2, "{}"))))[0]
    assert sum(p["value"] for x in series for p in x["points"]) == flame_total
    assert all(isinstance(p["timestamp"], str) for x in series for p in x["points"])

    profile = ok_json(call_json(ember, "SelectMergeProfile", {
        "profileTypeID": CPU, "labelSelector": SELECTOR, "start": 0, "end": END_MS}))
    strings = profile["stringTable"]
    assert [strings[int(profile["sampleType"][0][k])] for k in ("type", "unit")] == ["cpu", "nanoseconds"]
    want = folded(load_pprof(ok(call(ember, "SelectMergeProfile", s(1, CPU) + s(2, SELECTOR)))), 0)
    assert sum(int(x["value"][0]) for x in profile["sample"]) == sum(want.values()) > 0


def test_json_errors_name_the_field(ember):
    r = call_json(ember, "SelectMergeStacktraces", {"profileTypeID": CPU, "start": "soon"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    assert "start" in r.json()["message"], r.text
    r = call_json(ember, "SelectSeries", {"profileTypeID": CPU, "step": 15, "aggregation": "MEDIAN"})
    assert r.status_code == 400 and "TIME_SERIES_AGGREGATION_TYPE_SUM" in r.json()["message"]
    r = call_json(ember, "LabelNames", [1, 2])
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = requests.post(f"{ember.http}/querier.v1.QuerierService/LabelNames", data=b"{not json",
                      headers={"Content-Type": "application/json", "X-Scope-OrgID": "t"}, timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"


@pytest.fixture
def channel(ember):
    with grpc.insecure_channel(f"127.0.0.1:{ember.http_port}") as ch:
        yield ch


def grpc_call(channel, method, body, tenant="t", **kwargs):
    # No serializers: grpcio sends and returns the raw message bytes.
    stub = channel.unary_unary(f"/querier.v1.QuerierService/{method}")
    return stub(body, metadata=(("x-scope-orgid", tenant),), timeout=30, **kwargs)


def test_grpc_answers_what_connect_answers(ember, channel):
    for pod in ["p1", "p2"]:
        push(ember, "t", "api", pod)
    flame = s(1, CPU) + s(2, SELECTOR) + i64(3, 0) + i64(4, END_MS) + i64(5, 100000)
    for method, body in [
        ("SelectMergeStacktraces", flame),
        ("SelectMergeProfile", flame),
        ("LabelValues", s(1, "pod")),
        ("ProfileTypes", b""),
    ]:
        assert grpc_call(channel, method, body) == ok(call(ember, method, body)), method
    assert flame_graph(grpc_call(channel, "SelectMergeStacktraces", flame))[0] > 0
    # gzip-compressed messages, as grpc clients send them when asked.
    zipped = grpc_call(channel, "SelectMergeStacktraces", flame, compression=grpc.Compression.Gzip)
    assert zipped == ok(call(ember, "SelectMergeStacktraces", flame))
    # Tenants stay apart over gRPC too.
    assert flame_graph(grpc_call(channel, "SelectMergeStacktraces", flame, tenant="other"))[0] == 0


def test_grpc_errors_are_grpc_statuses(ember, channel):
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(channel, "NoSuchMethod", b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(channel, "LabelNames", s(1, "{service_name="))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "matcher" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(channel, "SelectMergeStacktraces", b"\xff\xff\xff")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server is unharmed: the next call answers.
    assert grpc_call(channel, "LabelNames", b"") is not None
