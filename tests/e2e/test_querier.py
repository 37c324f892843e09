"""Pyroscope's query API (querier.v1.QuerierService) on the HTTP port, as
Grafana's Pyroscope data source calls it: Connect unary, binary protobuf.
Requests are written and answers read by the tests' own protobuf code
(wire.py), and every answer is checked against what the SQL surface says
for the same data."""

import gzip

import requests

from conftest import FIXTURES, flame_stacks
from wire import _bytes_field, _key, _varint, fields, flame_graph_levels, graph_fields, signed

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
    names, levels, total, max_self = flame_graph_levels(buf)
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
    # The SQL functions answer from the same index.
    sql_pods = ember.sql("SELECT value FROM label_values('pod', '{service_name=\"web\"}', 0, 9999999999999)",
                         tenant="t").column("value").to_pylist()
    assert sql_pods == pods
    sql_names = ember.sql("SELECT name FROM label_names('{}', 0, 9999999999999)", tenant="t")
    assert sql_names.column("name").to_pylist() == names

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
    # The flame graph's arguments are checked as flamegraph() checks them.
    r = call(ember, "SelectMergeStacktraces", s(1, "a:b:c:d:e") + s(2, "{service_name="))
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument", r.text
    assert "flamegraph" in r.json()["message"], r.text
    r = call(ember, "LabelNames", b"", **{"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["code"] == "unimplemented"
    # A flame graph of a type nobody pushed is empty, not an error.
    r = call(ember, "SelectMergeStacktraces", s(1, "nothing:a:b:c:d") + s(2, "{}"))
    assert flame_graph(ok(r))[0] == 0


def double(num, x):
    import struct
    return _key(num, 1) + struct.pack("<d", x)


def series_response(buf):
    """SelectSeriesResponse -> [({name: value}, [(timestamp ms, value)])]."""
    import struct
    out = []
    for n, _, series in fields(buf):
        if n != 1:
            continue
        labels, points = {}, []
        for m, _, v in fields(series):
            if m == 1:
                pair = dict((k, x.decode()) for k, _, x in fields(v))
                labels[pair[1]] = pair.get(2, "")
            elif m == 2:
                p = dict((k, x) for k, _, x in fields(v))
                value = struct.unpack("<d", p.get(1, 0).to_bytes(8, "little"))[0]
                points.append((signed(p.get(2, 0)), value))
        out.append((labels, points))
    return out


def test_select_series_sums_profile_totals_per_step_and_group(ember):
    for pod in ["p1", "p2"]:
        push(ember, "t", "api", pod)
    push(ember, "t", "api", "p1")  # a second p1 profile, same time
    query = f"FROM profiles WHERE profile_type = '{CPU}' ORDER BY labels, time, total"
    rows = ember.sql(f"SELECT labels, total {query}", tenant="t").to_pylist()
    step = 15
    nanos = ember.sql(f"SELECT arrow_cast(time, 'Int64') AS t {query}", tenant="t").column("t").to_pylist()
    start_ms, end_ms = min(nanos) // 10**6 - 60_000, max(nanos) // 10**6 + 60_000
    want = {}
    for r, t_ns in zip(rows, nanos):
        pod = "p1" if 'pod="p1"' in r["labels"] else "p2"
        # A profile counts at the end of its step; steps are laid from start.
        steps = -(-(t_ns - start_ms * 10**6) // (step * 10**9))
        at = start_ms + steps * step * 1000
        want.setdefault(pod, {}).setdefault(at, 0)
        want[pod][at] += r["total"]
    body = (s(1, CPU) + s(2, '{service_name="api"}') + i64(3, start_ms) + i64(4, end_ms)
            + s(5, "pod") + double(6, step))
    got = series_response(ok(call(ember, "SelectSeries", body)))
    assert [labels for labels, _ in got] == [{"pod": "p1"}, {"pod": "p2"}]
    for labels, points in got:
        assert dict(points) == want[labels["pod"]]
    assert got[0][1][0][1] == 2 * got[1][1][0][1] > 0
    # Average (aggregation 1) halves p1's two profiles; limit keeps the top one.
    avg = series_response(ok(call(ember, "SelectSeries", body + i64(7, 1))))
    assert avg[0][1][0][1] == got[1][1][0][1]
    top = series_response(ok(call(ember, "SelectSeries", body + i64(9, 1))))
    assert [labels for labels, _ in top] == [{"pod": "p1"}]
    # The SQL surface answers the same from the same engine, wide.
    frame = ember.sql(f"SELECT * FROM series('{CPU}', '{{service_name=\"api\"}}', {start_ms}, {end_ms}, "
                      f"interval '{step} second', 'pod')", tenant="t")
    assert frame.column_names == ["time", '{pod="p1"}', '{pod="p2"}']
    assert frame.column('{pod="p1"}').to_pylist() == [v for _, v in got[0][1]]
    # A step that would make too many points, or none, is refused with why.
    r = call(ember, "SelectSeries", s(1, CPU) + i64(3, 0) + i64(4, 2**62 // 10**6) + double(6, 1))
    assert r.status_code == 400 and "widen the step" in r.json()["message"], r.text
    r = call(ember, "SelectSeries", s(1, CPU) + i64(3, 0) + i64(4, 1000))
    assert r.status_code == 400 and "step" in r.json()["message"], r.text
    # Another tenant sees no series.
    assert series_response(ok(call(ember, "SelectSeries", body, tenant="other"))) == []


def test_select_merge_profile_is_a_pprof_of_the_flame_graph(ember):
    from wire import folded, load_pprof, profile_types
    for pod in ["p1", "p2"]:
        push(ember, "t", "api", pod)
    selector = '{service_name="api"}'
    body = s(1, CPU) + s(2, selector) + i64(3, 0) + i64(4, 2**62 // 10**6) + i64(5, 100000)
    raw = ok(call(ember, "SelectMergeProfile", body))
    merged = load_pprof(raw)
    assert [merged["strings"][t] for t in merged["sample_type"][0]] == ["cpu", "nanoseconds"]
    got = folded(merged, 0)
    want_total, want_stacks, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{selector}', 0, 9999999999999, 100000)", tenant="t"))
    assert got == want_stacks
    # ... which is the input twice over (two pods pushed the same profile).
    source = load_pprof(RAW)
    index = profile_types(source, "process_cpu").index(CPU)
    input_total = sum(folded(source, index).values())
    assert sum(got.values()) == want_total == 2 * input_total
    # max_nodes truncates as the flame graph does; the total stays.
    small = load_pprof(ok(call(ember, "SelectMergeProfile", s(1, CPU) + s(2, selector) + i64(5, 8))))
    _, want8, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{selector}', 0, 9999999999999, 8)", tenant="t"))
    assert folded(small, 0) == want8 != got
    assert sum(want8.values()) == want_total and any(k.endswith("other") for k in want8)
    # Through SQL, the same bytes' profile.
    blob = ember.sql(f"SELECT profile FROM pprof('{CPU}', '{selector}', 0, 9999999999999, 100000)",
                     tenant="t").column("profile")[0].as_py()
    assert folded(load_pprof(blob), 0) == got
    assert folded(load_pprof(ok(call(ember, "SelectMergeProfile", body, tenant="other"))), 0) == {}


def test_profile_stats_bound_what_the_tenant_stored(ember):
    def stats(tenant):
        return dict((n, signed(v)) for n, _, v in fields(ok(call(ember, "GetProfileStats", b"", tenant=tenant))))
    assert stats("t").get(1, 0) == 0  # nothing ingested yet
    push(ember, "t", "api", "p1")
    got = stats("t")
    times = ember.sql("SELECT min(arrow_cast(time, 'Int64')) AS lo, max(arrow_cast(time, 'Int64')) AS hi "
                      "FROM profiles", tenant="t").to_pylist()[0]
    assert got[1] == 1
    assert (got[2], got[3]) == (times["lo"] // 10**6, times["hi"] // 10**6)
    assert stats("other").get(1, 0) == 0


OTHER = (FIXTURES / "pprof" / "go-cpu-exemplars.pb.gz").read_bytes()


def side_stacks(levels, names, side):
    """'a;b' -> self of one side of 7-number diff levels (side 0 or 1):
    each side's x offsets are delta encoded on their own."""
    bars = []
    for depth, values in enumerate(levels):
        end, row = 0, []
        for i in range(0, len(values), 7):
            off, total, own = values[i + 3 * side: i + 3 * side + 3]
            x = end + off
            end = x + total
            name = names[values[i + 6]]
            if depth == 0:
                path = []
            elif total == 0:
                path = None
            else:
                parent = next(b for b in bars[depth - 1] if b[3] is not None and b[1] and b[0] <= x < b[0] + b[1])
                path = parent[3] + [name]
            row.append((x, total, own, path))
        bars.append(row)
    out = {}
    for row in bars[1:]:
        for _, _, own, path in row:
            if own:
                key = ";".join(path)
                out[key] = out.get(key, 0) + own
    return out


def push_two_pods(ember):
    push(ember, "t", "api", "p1")
    labels = {"__name__": "process_cpu", "service_name": "api", "pod": "p2"}
    assert ember.push_proto([(labels, [OTHER])], tenant="t").status_code == 200


def sql_flame(ember, selector, max_nodes=100000):
    return flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{selector}', 0, 9999999999999, {max_nodes})", tenant="t"))


def test_diff_puts_two_selections_side_by_side(ember):
    push_two_pods(ember)
    left = s(1, CPU) + s(2, '{pod="p1"}') + i64(5, 100000)
    right = s(1, CPU) + s(2, '{pod="p2"}') + i64(5, 100000)
    body = _bytes_field(1, left) + _bytes_field(2, right)
    graph = next(v for n, _, v in fields(ok(call(ember, "Diff", body))) if n == 1)
    names, levels, scalars = graph_fields(graph)
    l_total, l_stacks, _ = sql_flame(ember, '{pod="p1"}')
    r_total, r_stacks, _ = sql_flame(ember, '{pod="p2"}')
    assert names[0] == "total" and l_stacks != r_stacks
    assert (scalars[5], scalars[6], scalars[3]) == (l_total, r_total, l_total + r_total)
    assert side_stacks(levels, names, 0) == l_stacks
    assert side_stacks(levels, names, 1) == r_stacks
    # The SQL frame Grafana's panel reads as a diff, from the same engine.
    frame = ember.sql(f"SELECT * FROM diff_flamegraph('{CPU}', '{{pod=\"p1\"}}', 0, 9999999999999, "
                      f"'{{pod=\"p2\"}}', 0, 9999999999999, 100000)", tenant="t")
    assert frame.column_names == ["level", "label", "value", "self", "valueRight", "selfRight"]
    assert sum(frame.column("self").to_pylist()) == l_total
    assert sum(frame.column("selfRight").to_pylist()) == r_total
    # Types must match.
    other = s(1, "memory:alloc_space:bytes:space:bytes")
    r = call(ember, "Diff", _bytes_field(1, left) + _bytes_field(2, other))
    assert r.status_code == 400 and "profile types must match" in r.json()["message"]


def test_render_api_answers_what_the_query_api_does(ember):
    push_two_pods(ember)
    nanos = ember.sql("SELECT arrow_cast(time, 'Int64') AS t FROM profiles", tenant="t").column("t").to_pylist()
    frm, until = str(min(nanos) // 10**9 - 60), str(max(nanos) // 10**9 + 60)
    headers = {"X-Scope-OrgID": "t"}
    query = f'{CPU}{{service_name="api"}}'
    r = requests.get(f"{ember.http}/pyroscope/render", headers=headers, timeout=30,
                     params={"query": query, "from": frm, "until": until, "format": "json", "max-nodes": "100000"})
    assert r.status_code == 200, r.text
    doc = r.json()
    fb = doc["flamebearer"]
    total, stacks, _ = sql_flame(ember, '{service_name="api"}')
    assert fb["names"][0] == "total" and fb["numTicks"] == total
    single = b"".join(_bytes_field(1, n.encode()) for n in fb["names"])
    for level in fb["levels"]:
        single += _bytes_field(2, _bytes_field(1, b"".join(_varint(v & (2**64 - 1)) for v in level)))
    single += i64(3, fb["numTicks"]) + i64(4, fb["maxSelf"])
    assert flame_graph(_bytes_field(1, single))[2] == stacks
    assert doc["metadata"] == {"format": "single", "spyName": "", "sampleRate": 1000000000,
                               "units": "samples", "name": "cpu"}
    timeline = doc["timeline"]
    step = max(15, (int(until) - int(frm)) // 1500)  # Pyroscope's: 1,500 points at most
    assert timeline["durationDelta"] == step and sum(timeline["samples"]) == total
    assert timeline["startTime"] % step == 0 and timeline["startTime"] <= int(frm)
    grouped = requests.get(f"{ember.http}/pyroscope/render", headers=headers, timeout=30,
                           params={"query": query, "from": frm, "until": until, "groupBy": "pod"}).json()
    assert set(grouped["groups"]) == {"p1", "p2"}
    assert sum(sum(g["samples"]) for g in grouped["groups"].values()) == total

    diff = requests.get(f"{ember.http}/pyroscope/render-diff", headers=headers, timeout=30, params={
        "leftQuery": f'{CPU}{{pod="p1"}}', "leftFrom": frm, "leftUntil": until,
        "rightQuery": f'{CPU}{{pod="p2"}}', "rightFrom": frm, "rightUntil": until, "max-nodes": "100000"}).json()
    assert diff["metadata"]["format"] == "double"
    assert (diff["leftTicks"], diff["rightTicks"]) == (sql_flame(ember, '{pod="p1"}')[0], sql_flame(ember, '{pod="p2"}')[0])
    assert side_stacks(diff["flamebearer"]["levels"], diff["flamebearer"]["names"], 1) == sql_flame(ember, '{pod="p2"}')[1]

    values = lambda **p: requests.get(f"{ember.http}/pyroscope/label-values", headers=headers, params=p, timeout=30)
    assert CPU in values(label="__name__").json()
    assert values(label="pod").json() == ["p1", "p2"]
    assert values(label="pod", query='{pod="p2"}').json() == ["p2"]
    names = requests.get(f"{ember.http}/pyroscope/labels", headers=headers, timeout=30).json()
    assert {"pod", "service_name"} <= set(names)
    assert requests.get(f"{ember.http}/pyroscope/label-values", params={"label": "pod"},
                        headers={"X-Scope-OrgID": "other"}, timeout=30).json() == []
    # Bad input is a 400 with the reason.
    for params, reason in [({}, '"query" is required'), ({"query": query, "from": "yesterday"}, "yesterday"),
                           ({"query": '{service_name="api"}'}, "profile type")]:
        r = requests.get(f"{ember.http}/pyroscope/render", headers=headers, params=params, timeout=30)
        assert r.status_code == 400 and reason in r.json()["message"], r.text


def test_select_merge_span_profile_keeps_only_the_spans_samples(ember):
    from wire import folded, load_pprof, profile_types
    raw = (FIXTURES / "pprof" / "go-cpu-span-ids.pb.gz").read_bytes()
    src = load_pprof(raw)
    st = src["strings"]
    spans = sorted({st[v] for smp in src["sample"] for k, v in smp["labels"] if st[k] == "span_id"})
    assert spans
    labels = {"__name__": "process_cpu", "service_name": "traced"}
    assert ember.push_proto([(labels, [raw])], tenant="t").status_code == 200
    ty = next(t for t in profile_types(src, "process_cpu") if ":cpu:" in t)
    index = profile_types(src, "process_cpu").index(ty)

    def span_graph(ids, tenant="t"):
        body = s(1, ty) + s(2, '{service_name="traced"}') + b"".join(s(3, i) for i in ids)
        body += i64(4, 0) + i64(5, 2**62 // 10**6) + i64(6, 100000)
        return flame_graph(ok(call(ember, "SelectMergeSpanProfile", body, tenant=tenant)))

    one = folded(src, index, {"span_id": spans[0]})
    total, _, stacks = span_graph([spans[0]])
    assert stacks == one and total == sum(one.values()) > 0
    # A span nobody recorded adds nothing; samples outside the span are left out.
    assert span_graph([spans[0], "abcdef0123456789"])[0] == total
    assert span_graph(["abcdef0123456789"])[0] == 0
    everything, _, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{ty}', '{{}}', 0, 9999999999999)", tenant="t"))
    assert total < everything == sum(folded(src, index).values())
    assert span_graph([spans[0]], tenant="other")[0] == 0
    r = call(ember, "SelectMergeSpanProfile", s(1, ty) + s(3, "not-hex"))
    assert r.status_code == 400 and "not hex" in r.json()["message"], r.text
    # The TREE format holds the same stacks.
    body = s(1, ty) + s(2, '{service_name="traced"}') + s(3, spans[0]) + i64(6, 100000) + i64(7, 2)
    tree = next(v for n, _, v in fields(ok(call(ember, "SelectMergeSpanProfile", body))) if n == 2)
    assert tree_stacks(tree) == one
    # Newer clients put the spans in SelectMergeStacktraces (field 11).
    body = s(1, ty) + s(2, '{service_name="traced"}') + i64(5, 100000) + s(11, spans[0])
    assert flame_graph(ok(call(ember, "SelectMergeStacktraces", body)))[:3:2] == (total, stacks)
    # Trace IDs are not stored: refused, never answered unfiltered.
    r = call(ember, "SelectMergeStacktraces", s(1, ty) + s(10, "4bf92f3577b34da6a3ce929d0e0e4736"))
    assert r.status_code == 501 and r.json()["code"] == "unimplemented", r.text


def tree_stacks(buf):
    """Pyroscope tree bytes -> 'a;b' -> self, read as UnmarshalTree does."""
    from wire import varint
    i, parents, out, first = 0, [[]], {}, True
    while parents:
        parent = parents.pop()
        n, i = varint(buf, i)
        name, i = buf[i:i + n].decode(), i + n
        own, i = varint(buf, i)
        kids, i = varint(buf, i)
        path = parent if first else parent + [name]
        first = False
        if own:
            out[";".join(path)] = out.get(";".join(path), 0) + own
        parents += [path] * kids
    assert i == len(buf)
    return out


def test_tree_format_holds_the_flame_graph_stacks(ember):
    push(ember, "t", "api", "p1")
    body = s(1, CPU) + s(2, '{service_name="api"}') + i64(5, 100000) + i64(6, 2)
    tree = next(v for n, _, v in fields(ok(call(ember, "SelectMergeStacktraces", body))) if n == 2)
    _, want, _ = sql_flame(ember, '{service_name="api"}')
    assert tree_stacks(tree) == want
