"""OTLP profiles in, as the OpenTelemetry eBPF profiler exports them: the
recorded capture over HTTP (protobuf, JSON, gzip) and over gRPC, its flame
graphs out over Flight SQL equal to what Pyroscope made of the same capture
(`*.expected.json`: stacks and totals)."""

import collections
import gzip
import json

import grpc
import pytest
import requests

from conftest import FIXTURES, flame_stacks

OTLP = FIXTURES / "otlp"
BIN = (OTLP / "otel-ebpf-profile.pb.bin").read_bytes()
JSON = (OTLP / "otel-ebpf-profile.pb.json").read_bytes()
FAR = 9_999_999_999_999
EXPECTED = {
    "process_cpu:cpu:nanoseconds:cpu:nanoseconds": "otel-ebpf-profile-cpu.expected.json",
    "off_cpu:off_cpu:nanoseconds::": "otel-ebpf-profile-offcpu.expected.json",
}


def expected_stacks(name):
    """The expected file's samples as 'root;...;leaf' -> value."""
    out = collections.Counter()
    for s in json.loads((OTLP / name).read_text())["samples"]:
        names = [line.split("[", 1)[0] for loc in s["locations"] for line in loc["lines"]]
        out[";".join(reversed(names))] += int(s["values"])
    return dict(out)


def post(ember, body, content_type, tenant, **headers):
    return requests.post(f"{ember.http}/v1development/profiles", data=body, timeout=30,
                         headers={"Content-Type": content_type, "X-Scope-OrgID": tenant, **headers})


def check_flame_graphs(ember, tenant):
    for profile_type, name in EXPECTED.items():
        want = expected_stacks(name)
        total, got, _ = flame_stacks(ember.sql(
            f"SELECT * FROM flamegraph('{profile_type}', '{{service_name=\"unknown_service\"}}', 0, {FAR}, 1000000)",
            tenant=tenant))
        assert got == want, profile_type
        assert total == sum(want.values()) > 0


@pytest.mark.parametrize("encoding", ["proto", "proto-gzip", "json", "json-gzip"])
def test_http_export_matches_pyroscope(ember, encoding):
    body, content_type = (BIN, "application/x-protobuf") if encoding.startswith("proto") else (JSON, "application/json")
    headers = {}
    if encoding.endswith("gzip"):
        body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
    r = post(ember, body, content_type, "t", **headers)
    assert r.status_code == 200, r.text
    check_flame_graphs(ember, "t")
    # Resource and sample attributes are labels, named as Pyroscope names them.
    names = set(ember.sql("SELECT name FROM label_names('{}', 0, 9999999999999)", tenant="t").column("name").to_pylist())
    assert {"process_pid", "thread_name", "service_name"} <= names
    services = ember.sql("SELECT DISTINCT service_name FROM profiles", tenant="t").column("service_name").to_pylist()
    assert "unknown_service" in services and "unknown_service:containerd" in services
    assert ember.sql("SELECT count(*) AS n FROM profiles", tenant="other").column("n")[0].as_py() == 0


def test_grpc_export_matches_pyroscope(ember):
    with grpc.insecure_channel(f"127.0.0.1:{ember.http_port}") as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export")
        reply = export(BIN, metadata=(("x-scope-orgid", "g"),), timeout=30,
                       compression=grpc.Compression.Gzip)
        assert reply == b""  # ExportProfilesServiceResponse: nothing rejected
        check_flame_graphs(ember, "g")
        with pytest.raises(grpc.RpcError) as e:
            export(BIN[: len(BIN) // 3], metadata=(("x-scope-orgid", "g"),), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_exports_are_refused_with_the_reason_and_harm_nothing(ember):
    r = post(ember, BIN[: len(BIN) // 3], "application/x-protobuf", "t")
    assert r.status_code == 400 and "OTLP" in r.json()["message"], r.text
    r = post(ember, b'{"resourceProfiles":[{"scopeProfiles":[{"profiles":[{"sampleType":{"typeStrindex":1},'
                    b'"samples":[{"stackIndex":7,"values":["1"]}]}]}]}],'
                    b'"dictionary":{"stringTable":["","cpu"]}}', "application/json", "t")
    assert r.status_code == 400 and "stack index 7" in r.json()["message"], r.text
    r = post(ember, BIN, "text/plain", "t")
    assert r.status_code == 400 and "content type" in r.json()["message"]
    r = post(ember, gzip.compress(b"\0" * ((64 << 20) + 1)), "application/x-protobuf", "t",
             **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "exceeds the limit" in r.json()["message"], r.text
    # Nothing of the refused requests was stored; a good one still goes in.
    assert ember.sql("SELECT count(*) AS n FROM profiles", tenant="t").column("n")[0].as_py() == 0
    assert post(ember, BIN, "application/x-protobuf", "t").status_code == 200
    check_flame_graphs(ember, "t")
