"""Profiles in over the push API and /ingest, totals and flame graphs out over
Flight SQL, checked against an independent decoding of the same input."""

import gzip
import threading

import pyarrow.flight as pf
import pytest
import requests

from conftest import FIXTURES, flame_stacks
from wire import flight_sql_command, folded, load_pprof, period_name, profile_types, totals

FAR = 9_999_999_999_999
PPROF = sorted(p for p in (FIXTURES / "pprof").iterdir())


def service_of(path):
    return "svc-" + path.name.split(".")[0]


def sums_by_service(ember, tenant=None):
    t = ember.sql("SELECT service_name, profile_type, sum(value) AS total FROM samples GROUP BY 1, 2", tenant)
    return {(r["service_name"], r["profile_type"]): r["total"] for r in t.to_pylist()}


def push_all_fixtures(ember):
    """Pushes every fixture: proto, JSON and /ingest in turn. Returns expected totals."""
    expected = {}
    for i, path in enumerate(PPROF):
        raw = path.read_bytes()
        p = load_pprof(raw)
        service = service_of(path)
        mode = i % 3
        if mode == 2:
            r = requests.post(f"{ember.http}/ingest", params={"name": f"{service}.cpu{{env=ci}}", "format": "pprof"},
                              data=raw, timeout=30)
            name = period_name(p)
        else:
            labels = {"__name__": "fixture", "service_name": service, "env": "ci"}
            r = ember.push_proto([(labels, [raw])], json=(mode == 1))
            name = "fixture"
        assert r.status_code == 200, (path.name, r.text)
        for pt, v in totals(p, name).items():
            expected[(service, pt)] = expected.get((service, pt), 0) + v
    return expected


def test_totals_equal_input_for_every_fixture(ember):
    expected = push_all_fixtures(ember)
    assert len(expected) > len(PPROF)
    assert sums_by_service(ember) == expected
    profiles = ember.sql("SELECT service_name, profile_type, sum(total) AS total FROM profiles GROUP BY 1, 2").to_pylist()
    assert {(r["service_name"], r["profile_type"]): r["total"] for r in profiles} == expected


@pytest.mark.parametrize("name", ["go-cpu.pb.gz", "nodejs-cpu.pb.gz", "python-pyspy.pb.gz", "dotnet-3.pb.gz",
                                  "go-cpu-deep-stacks.pb.gz", "go-heap.pb.gz"])
def test_flamegraph_stacks_equal_input(ember, name):
    raw = (FIXTURES / "pprof" / name).read_bytes()
    p = load_pprof(raw)
    r = ember.push_proto([({"__name__": "fx", "service_name": "flame"}, [raw])])
    assert r.status_code == 200, r.text
    for index, pt in enumerate(profile_types(p, "fx")):
        want = folded(p, index)
        if not want:
            continue
        t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"flame\"}}', 0, {FAR}, 1000000)")
        assert t.schema.names == ["level", "value", "self", "label"]
        total, got, _ = flame_stacks(t)
        assert total == sum(want.values())
        assert got == want


def test_selector_on_sample_labels_selects_exactly_those_samples(ember):
    raw = (FIXTURES / "pprof" / "go-cpu-labels.pprof").read_bytes()
    p = load_pprof(raw)
    s = p["strings"]
    label_sets = {tuple(sorted((s[k], s[v]) for k, v in smp["labels"] if v)) for smp in p["sample"]}
    keys = sorted({k for ls in label_sets for k, _ in ls if k not in ("span_id", "profile_id")})
    assert keys, "fixture should carry pprof labels"
    key = keys[0]
    values = sorted({v for ls in label_sets for k, v in ls if k == key})
    r = ember.push_proto([({"__name__": "process_cpu", "service_name": "labelled"}, [raw])])
    assert r.status_code == 200, r.text
    pt = profile_types(p, "process_cpu")[-1]
    index = len(p["sample_type"]) - 1
    for value in values:
        want = folded(p, index, {key: value})
        t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"labelled\", {key}=\"{value}\"}}', 0, {FAR})")
        total, got, _ = flame_stacks(t)
        assert got == want and total == sum(want.values())
    t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"labelled\", {key}=~\"nomatch.*\"}}', 0, {FAR})")
    assert t.num_rows == 1 and t.column("value")[0].as_py() == 0


def test_span_ids_are_kept_per_sample_not_as_labels(ember):
    raw = (FIXTURES / "pprof" / "go-cpu-span-ids.pb.gz").read_bytes()
    r = ember.push_proto([({"__name__": "process_cpu", "service_name": "spans"}, [raw])])
    assert r.status_code == 200
    t = ember.sql("SELECT count(span_id) AS with_span, count(*) AS n FROM samples WHERE service_name = 'spans'")
    row = t.to_pylist()[0]
    assert 0 < row["with_span"] <= row["n"]
    labels = ember.sql("SELECT DISTINCT labels FROM samples WHERE service_name = 'spans'").column("labels").to_pylist()
    assert labels and not any("span_id" in l for l in labels)


def test_folded_ingest_and_timestamps(ember):
    body = b"main;work;leaf 7\nmain;work 3\nmain;idle 0\nmain;work;leaf 1\n"
    r = requests.post(f"{ember.http}/ingest", params={"name": "folded.cpu{region=eu}", "from": "1700000000", "until": "1700000010"},
                      data=body, timeout=10)
    assert r.status_code == 200, r.text
    pt = "process_cpu:samples:count:cpu:nanoseconds"
    t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"folded\", region=\"eu\"}}', "
                  "cast('2023-11-14T22:13:00Z' as timestamp), cast('2023-11-14T22:14:00Z' as timestamp))")
    total, got, _ = flame_stacks(t)
    assert (total, got) == (11, {"main;work;leaf": 8, "main;work": 3})
    # Outside the time range: nothing.
    t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"folded\"}}', 0, 1000)")
    assert t.column("value")[0].as_py() == 0


def test_max_nodes_truncates_into_other(ember):
    raw = (FIXTURES / "pprof" / "go-heap.pb.gz").read_bytes()
    p = load_pprof(raw)
    ember.push_proto([({"__name__": "memory", "service_name": "trunc"}, [raw])])
    pt = profile_types(p, "memory")[1]
    full = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{}}', 0, {FAR})")
    small = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{}}', 0, {FAR}, 20)")
    assert small.num_rows < full.num_rows
    assert "other" in small.column("label").to_pylist()
    assert small.column("value")[0].as_py() == full.column("value")[0].as_py()
    # Every level's children never exceed their parent.
    rows = small.to_pylist()
    for i, r in enumerate(rows):
        kids = []
        for c in rows[i + 1:]:
            if c["level"] <= r["level"]:
                break
            if c["level"] == r["level"] + 1:
                kids.append(c["value"])
        assert sum(kids) + r["self"] == r["value"]


def test_tenants_never_see_each_other(ember):
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "secret"}, [raw])], tenant="team-a").status_code == 200
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "public"}, [raw])]).status_code == 200
    a = sums_by_service(ember, "team-a")
    assert {s for s, _ in a} == {"secret"}
    anon = sums_by_service(ember)
    assert {s for s, _ in anon} == {"public"}
    assert sums_by_service(ember, "team-b") == {}
    for table in ["samples", "profiles", "stacks"]:
        assert ember.sql(f"SELECT count(*) AS n FROM {table}", "team-b").column("n")[0].as_py() == 0
        assert ember.sql(f"SELECT count(*) AS n FROM {table}", "team-a").column("n")[0].as_py() > 0
    pt = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
    t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"secret\"}}', 0, {FAR})", "team-b")
    assert t.column("value")[0].as_py() == 0
    t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"secret\"}}', 0, {FAR})", "team-a")
    assert t.column("value")[0].as_py() > 0
    with pytest.raises(Exception):
        ember.sql("SELECT count(*) FROM ember.\"team-a\".samples", "team-b")


def test_pyarrow_flight_client(ember):
    raw = (FIXTURES / "pprof" / "nodejs-cpu.pb.gz").read_bytes()
    p = load_pprof(raw)
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "node"}, [raw])], tenant="pa").status_code == 200
    client = pf.FlightClient(ember.flight)
    options = pf.FlightCallOptions(headers=[(b"x-scope-orgid", b"pa")])
    query = "SELECT profile_type, sum(value) AS total FROM samples GROUP BY 1 ORDER BY 1"
    info = client.get_flight_info(pf.FlightDescriptor.for_command(flight_sql_command(query)), options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    got = dict(zip(table.column("profile_type").to_pylist(), table.column("total").to_pylist()))
    assert got == totals(p, "process_cpu")


def test_sql_cannot_reach_the_file_system(ember, tmp_path):
    target = tmp_path / "out.csv"
    for sql in [f"CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
                f"COPY (SELECT 1) TO '{target}'",
                "SET datafusion.execution.batch_size = 1"]:
        with pytest.raises(Exception) as e:
            ember.sql(sql)
        assert "not supported" in str(e.value).lower() or "not allowed" in str(e.value).lower() or "invalid" in str(e.value).lower()
    assert not target.exists()
    assert ember.alive()


def test_query_over_memory_limit_fails_cleanly(make_ember):
    ember = make_ember("--query-memory-limit", str(2 << 20))
    raw = (FIXTURES / "pprof" / "go-heap-large.pb.gz").read_bytes()
    assert ember.push_proto([({"__name__": "memory", "service_name": "big"}, [raw])]).status_code == 200
    with pytest.raises(Exception) as e:
        ember.sql("SELECT count(DISTINCT s.stack_id * 1000 + g.value) FROM samples s CROSS JOIN generate_series(1, 2000) g")
    assert "memory" in str(e.value).lower() or "resources exhausted" in str(e.value).lower()
    assert ember.alive()
    assert sums_by_service(ember)


def test_bad_input_gets_clear_errors_and_harms_nothing(make_ember):
    ember = make_ember("--max-request-bytes", str(1 << 20), "--max-decompressed-bytes", str(8 << 20))
    good = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    p = load_pprof(good)
    bomb = gzip.compress(b"\0" * (64 << 20))
    truncated = gzip.decompress(good)[: len(gzip.decompress(good)) // 2]
    bad_requests = {
        "truncated": lambda: ember.push_proto([({"service_name": "bad"}, [truncated])]),
        "garbage": lambda: ember.push_proto([({"service_name": "bad"}, [b"\x0a\xff\xff\xff\xff"])]),
        "bomb": lambda: ember.push_proto([({"service_name": "bad"}, [bomb])], gzip_body=False),
        "bad body": lambda: requests.post(f"{ember.http}/push.v1.PusherService/Push", data=b"\xff\xff", headers={"Content-Type": "application/proto"}),
        "bad json": lambda: requests.post(f"{ember.http}/push.v1.PusherService/Push", data=b"{nope", headers={"Content-Type": "application/json"}),
        "bad label": lambda: ember.push_proto([({"service_name": "bad", "bad-name": "x"}, [good])]),
        "format": lambda: requests.post(f"{ember.http}/ingest", params={"name": "x.cpu", "format": "trie2"}, data=b"x"),
        "no name": lambda: requests.post(f"{ember.http}/ingest", data=b"a 1"),
        "content type": lambda: requests.post(f"{ember.http}/push.v1.PusherService/Push", data=b"", headers={"Content-Type": "text/plain"}),
        "tenant": lambda: ember.push_proto([({"service_name": "bad"}, [good])], tenant="../x"),
    }
    # A good push in the same flush windows as the bad ones.
    results = {}
    good_thread = threading.Thread(target=lambda: results.setdefault("good", ember.push_proto([({"__name__": "process_cpu", "service_name": "good"}, [good])])))
    good_thread.start()
    for name, send in bad_requests.items():
        r = send()
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["message"], name
    too_big = ember.push_proto([({"service_name": "big"}, [b"x" * (2 << 20)])], gzip_body=False)
    assert too_big.status_code == 413, too_big.text
    assert "limit" in too_big.json()["message"]
    good_thread.join()
    assert results["good"].status_code == 200
    for path in sorted((FIXTURES / "pprof-invalid").iterdir()):
        r = ember.push_proto([({"__name__": "process_cpu", "service_name": "odd"}, [path.read_bytes()])])
        assert r.status_code in (200, 400), (path.name, r.text)
        if r.status_code == 400:
            assert r.json()["message"]
    assert ember.alive()
    got = sums_by_service(ember)
    assert {k: v for k, v in got.items() if k[0] == "good"} == {("good", pt): v for pt, v in totals(p, "process_cpu").items()}
    assert not any(k[0] in ("bad", "big") for k in got)
    metrics = requests.get(f"{ember.http}/metrics").text.splitlines()
    assert any(line.startswith('ember_push_errors_total{reason="decode"} ') for line in metrics)
    flushes = [line for line in metrics if line.startswith("ember_segment_flushes_total ")]
    assert flushes and float(flushes[0].split()[1]) >= 1
    # The shards keep the stack node ids of what they wrote.
    node_bytes = [line for line in metrics if line.startswith("ember_segment_stack_node_bytes ")]
    assert node_bytes and float(node_bytes[0].split()[1]) > 0


def test_cli_query_prints_the_flamegraph(ember):
    import subprocess

    from conftest import BIN

    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    p = load_pprof(raw)
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "cli"}, [raw])], tenant="cli-t").status_code == 200
    pt = profile_types(p, "process_cpu")[-1]
    out = subprocess.run(
        [str(BIN), "query", "--flight-url", f"http://127.0.0.1:{ember.flight_port}", "--tenant", "cli-t",
         f"SELECT level, value, label FROM flamegraph('{pt}', '{{service_name=\"cli\"}}', 0, {FAR}) LIMIT 3"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    assert rows[0] == ["level", "value", "label"]
    assert rows[1] == ["0", str(sum(folded(p, len(p["sample_type"]) - 1).values())), "total"]
    assert len(rows) == 4
    bad = subprocess.run([str(BIN), "query", "--flight-url", f"http://127.0.0.1:{ember.flight_port}", "SELEKT 1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "SELEKT" in bad.stderr


def test_multipart_ingest_as_older_agents_send_it(ember):
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    p = load_pprof(raw)
    files = {"profile": ("profile.pprof", raw, "application/octet-stream"),
             "sample_type_config": ("config.json", b'{"cpu": {"units": "nanoseconds"}}', "application/json")}
    r = requests.post(f"{ember.http}/ingest", params={"name": "multi.cpu{env=ci}", "format": "pprof"}, files=files, timeout=30)
    assert r.status_code == 200, r.text
    got = {pt: v for (svc, pt), v in sums_by_service(ember).items() if svc == "multi"}
    assert got == totals(p, period_name(p))
    r = requests.post(f"{ember.http}/ingest", params={"name": "multi.cpu"}, files={"other": ("x", b"x")}, timeout=30)
    assert r.status_code == 400 and "no \"profile\" field" in r.json()["message"]
    r = requests.post(f"{ember.http}/ingest", params={"name": "multi.cpu"}, data=b"--x\r\nbroken",
                      headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=30)
    assert r.status_code == 400 and r.json()["message"]
