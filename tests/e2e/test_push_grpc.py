"""push.v1.PusherService/Push over gRPC (HTTP/2 on the HTTP port, beside
Connect), from grpcio as a generated client sends it: every pprof fixture in,
totals and flame graph stacks out over Flight SQL equal to the input."""

import grpc
import pytest

from conftest import FIXTURES, flame_stacks
from test_ingest_query import FAR, PPROF, service_of, sums_by_service
from wire import folded, load_pprof, profile_types, push_request, totals


@pytest.fixture
def push(ember):
    with grpc.insecure_channel(f"127.0.0.1:{ember.http_port}") as channel:
        stub = channel.unary_unary("/push.v1.PusherService/Push")

        def call(series, tenant="t", **kwargs):
            return stub(push_request(series), metadata=(("x-scope-orgid", tenant),), timeout=30, **kwargs)
        yield call


def test_every_fixture_over_grpc_keeps_its_totals(ember, push):
    expected = {}
    for i, path in enumerate(PPROF):
        raw = path.read_bytes()
        labels = {"__name__": "fixture", "service_name": service_of(path)}
        # Every other push gzip-compresses the gRPC message too.
        compression = grpc.Compression.Gzip if i % 2 else grpc.Compression.NoCompression
        assert push([(labels, [raw])], compression=compression) == b""
        for pt, v in totals(load_pprof(raw), "fixture").items():
            key = (service_of(path), pt)
            expected[key] = expected.get(key, 0) + v
    assert sums_by_service(ember, "t") == expected


def test_grpc_push_flame_graph_equals_the_input(ember, push):
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    p = load_pprof(raw)
    push([({"__name__": "process_cpu", "service_name": "g"}, [raw])])
    for index, pt in enumerate(profile_types(p, "process_cpu")):
        want = folded(p, index)
        total, got, _ = flame_stacks(ember.sql(
            f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"g\"}}', 0, {FAR}, 1000000)", tenant="t"))
        assert got == want and total == sum(want.values())
    # Another tenant sees none of it.
    assert sums_by_service(ember, "other") == {}


def test_bad_grpc_pushes_are_statuses_and_harm_nothing(ember, push):
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    good = [({"__name__": "process_cpu", "service_name": "ok"}, [raw])]
    with pytest.raises(grpc.RpcError) as e:
        push([({"__name__": "process_cpu", "service_name": "bad"}, [b"not a profile"])])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        push([({"__name__": "process_cpu", "service_name": "bad", "bad label!": "x"}, [raw])])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert push(good) == b""
    sums = sums_by_service(ember, "t")
    assert {s for s, _ in sums} == {"ok"}
    assert sums == {("ok", pt): v for pt, v in totals(load_pprof(raw), "process_cpu").items()}
