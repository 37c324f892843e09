"""Pyroscope's query API (querier.v1.QuerierService) on the HTTP port, as
Grafana's Pyroscope data source calls it: Connect unary, binary protobuf.
Requests are written and answers read by the tests' own protobuf code
(wire.py), and every answer is checked against what the SQL surface says
for the same data."""

import gzip

import requests

from conftest import FIXTURES, flame_stacks
from wire import _bytes_field, _key, _varint, fields, repeated_varints, signed

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
RAW = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()


def s(num, text):
    return _bytes_field(num, text.encode())


def i64(num, n):
    return _key(num, 0) + _varint(n & (2**64 - 1))


def call(ember, method, body, tenant="t", **headers):
    return requests.post(f"{ember.http}/querier.v1.QuerierService/{method}", data=body,
                         headers={"Content-Type": "application/proto", "X-Scope-OrgID": tenant, **headers},
                         timeout=30)


def ok(r):
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/proto"
    return r.content


def strings(buf, num):
    return [v.decode() for n, _, v in fields(buf) if n == num]


def label_sets(buf):
    """SeriesResponse -> [{name: value}]."""
    out = []
    for n, _, labels in fields(buf):
        if n == 2:
            pairs = [dict((k, v.decode()) for k, _, v in fields(p)) for m, _, p in fields(labels) if m == 1]
            out.append({p[1]: p.get(2, "") for p in pairs})
    return out


def flame_graph(buf):
    """SelectMergeStacktracesResponse -> (total, max_self, 'a;b' -> self),
    decoding the levels as Grafana does: each bar's x is its offset plus the
    end of the previous bar on its level; a bar's parent is the bar above it
    whose range holds its x."""
    graph = next(v for n, _, v in fields(buf) if n == 1)
    names, levels, total, max_self = [], [], 0, 0
    for n, wt, v in fields(graph):
        if n == 1:
            names.append(v.decode())
        elif n == 2:
            values = []
            for m, wt2, x in fields(v):
                if m == 1:
                    values += [signed(y) for y in repeated_varints(wt2, x)]
            levels.append(values)
        elif n == 3:
            total = signed(v)
        elif n == 4:
            max_self = signed(v)
    assert names[0] == "total" and levels[0][:2] == [0, total] and levels[0][3] == 0
    bars = []  # per level: [(x, total, self, path)]
    for depth, values in enumerate(levels):
        end, row = 0, []
        for i in range(0, len(values), 4):
            x = end + values[i]
            end = x + values[i + 1]
            name = names[values[i + 3]]
            if depth == 0:
                path = []
            else:
                parent = next(b for b in bars[depth - 1] if b[0] <= x < b[0] + b[1] or b[1] == 0 and b[0] == x)
                path = parent[3] + [name]
            row.append((x, values[i + 1], values[i + 2], path))
        bars.append(row)
    stacks = {}
    for row in bars[1:]:
        for _, _, own, path in row:
            if own:
                key = ";".join(path)
                stacks[key] = stacks.get(key, 0) + own
    return total, max_self, stacks


def push(ember, tenant, service, pod):
    labels = {"__name__": "process_cpu", "service_name": service, "pod": pod}
    r = ember.push_proto([(labels, [RAW])], tenant=tenant)
    assert r.status_code == 200, r.text


def test_label_calls_answer_what_sql_sees(ember):
    push(ember, "t", "api", "p1")
    push(ember, "t", "api", "p2")
    push(ember, "t", "web", "p1")
    push(ember, "other", "secret", "p9")  # another tenant: never seen by t

    types = [dict((n, v.decode()) for n, _, v in fields(pt))
             for _, _, pt in fields(ok(call(ember, "ProfileTypes", i64(1, 1) + i64(2, 2**62))))]
    sql_types = sorted(r["profile_type"] for r in ember.sql(
        "SELECT DISTINCT profile_type FROM profiles", tenant="t").to_pylist())
    assert sorted(t[1] for t in types) == sql_types
    cpu = next(t for t in types if t[1] == CPU)
    assert (cpu[2], cpu[4], cpu[5], cpu[6], cpu[7]) == ("process_cpu", "cpu", "nanoseconds", "cpu", "nanoseconds")

    names = strings(ok(call(ember, "LabelNames", b"")), 1)
    assert {"service_name", "pod", "__profile_type__", "__name__"} <= set(names)
    services = strings(ok(call(ember, "LabelValues", s(1, "service_name"))), 1)
    sql_services = sorted(r["service_name"] for r in ember.sql(
        "SELECT DISTINCT service_name FROM profiles", tenant="t").to_pylist())
    assert services == sql_services == ["api", "web"]
    pods = strings(ok(call(ember, "LabelValues", s(1, "pod") + s(2, '{service_name="web"}'))), 1)
    assert pods == ["p1"]

    series = label_sets(ok(call(ember, "Series", s(1, f'{{service_name="api", __profile_type__="{CPU}"}}'))))
    assert sorted(x["pod"] for x in series) == ["p1", "p2"]
    assert all(x["__profile_type__"] == CPU and x["service_name"] == "api" for x in series)
    only = label_sets(ok(call(ember, "Series", s(1, '{service_name="api"}') + s(2, "pod"))))
    assert sorted(map(tuple, (sorted(x.items()) for x in only))) == [(("pod", "p1"),), (("pod", "p2"),)]


def test_select_merge_stacktraces_equals_the_sql_flame_graph(ember):
    for pod in ["p1", "p2"]:
        push(ember, "t", "api", pod)
    selector = '{service_name="api"}'
    body = s(1, CPU) + s(2, selector) + i64(3, 0) + i64(4, 2**62 // 10**6) + i64(5, 100000)
    total, max_self, stacks = flame_graph(ok(call(ember, "SelectMergeStacktraces", body)))
    want_total, want_stacks, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{selector}', 0, 9999999999999, 100000)", tenant="t"))
    assert total == want_total > 0
    assert stacks == want_stacks
    assert max_self == max(want_stacks.values())
    # gzip-compressed requests, as Connect clients may send them.
    zipped = call(ember, "SelectMergeStacktraces", gzip.compress(body), **{"Content-Encoding": "gzip"})
    assert flame_graph(ok(zipped))[0] == total
    # max_nodes truncates into `other` as SQL does, and keeps the total.
    small = s(1, CPU) + s(2, selector) + i64(5, 8)
    t8, _, stacks8 = flame_graph(ok(call(ember, "SelectMergeStacktraces", small)))
    _, want8, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{selector}', 0, 9999999999999, 8)", tenant="t"))
    assert t8 == total and stacks8 == want8
    assert any(k.endswith("other") for k in stacks8) and stacks8 != stacks
    # Another tenant sees nothing of t's.
    empty = flame_graph(ok(call(ember, "SelectMergeStacktraces", body, tenant="other")))
    assert empty[0] == 0 and empty[2] == {}


def test_errors_are_connect_errors(ember):
    r = call(ember, "NoSuchMethod", b"")
    assert r.status_code == 501 and r.json()["code"] == "unimplemented", r.text
    r = call(ember, "LabelNames", s(1, "{service_name="))
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    assert "matcher" in r.json()["message"]
    r = call(ember, "SelectMergeStacktraces", b"\xff\xff\xff")
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = call(ember, "SelectMergeStacktraces", s(1, CPU) + i64(6, 2))
    assert r.status_code == 501 and "TREE" in r.json()["message"]
    r = call(ember, "LabelNames", b"", **{"Content-Type": "application/json"})
    assert r.status_code == 415 and r.json()["code"] == "unimplemented"
    # A flame graph of a type nobody pushed is empty, not an error.
    r = call(ember, "SelectMergeStacktraces", s(1, "nothing:a:b:c:d") + s(2, "{}"))
    assert flame_graph(ok(r))[0] == 0
