"""Trust: no tenant sees another's data, no input takes the server down or
poisons later queries, and recovery never loses or doubles a block."""

import gzip
import json
import time

import pytest
import requests

from conftest import FIXTURES, flame_stacks
from wire import _bytes_field, _key, _varint, folded, load_pprof, profile_types

FAR = 9_999_999_999_999
CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
NOW_NS = lambda: time.time_ns()  # noqa: E731


def with_time(raw, nanos):
    """The pprof with its time_nanos set (a later scalar field wins)."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw + _key(9, 0) + _varint(nanos & (2**64 - 1))


def deep_pprof(depth, value=7):
    """One cpu sample whose stack is `depth` distinct frames, f0 the leaf."""
    strings = [b"", b"cpu", b"nanoseconds"] + [f"f{i}".encode() for i in range(depth)]
    out = _bytes_field(1, _key(1, 0) + _varint(1) + _key(2, 0) + _varint(2))
    locs = b"".join(_varint(i + 1) for i in range(depth))
    out += _bytes_field(2, _bytes_field(1, locs) + _bytes_field(2, _varint(value)))
    for i in range(depth):
        line = _bytes_field(4, _key(1, 0) + _varint(i + 1))
        out += _bytes_field(4, _key(1, 0) + _varint(i + 1) + line)
        out += _bytes_field(5, _key(1, 0) + _varint(i + 1) + _key(2, 0) + _varint(i + 3))
    for s in strings:
        out += _bytes_field(6, s)
    out += _bytes_field(11, _key(1, 0) + _varint(1) + _key(2, 0) + _varint(2))
    out += _key(9, 0) + _varint(NOW_NS())
    return gzip.compress(out)


def segment_objects(ember):
    return sorted((ember.data_dir / "objects" / "segments").rglob("block.bin"))


def test_two_tenants_one_service_one_flush_never_see_each_other(make_ember, tmp_path):
    a_raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    b_raw = (FIXTURES / "pprof" / "go-cpu-labels.pprof").read_bytes()
    want = {}
    for tenant, raw in [("team-a", a_raw), ("team-b", b_raw)]:
        p = load_pprof(raw)
        index = profile_types(p, "process_cpu").index(CPU)
        want[tenant] = folded(p, index)
    assert want["team-a"] != want["team-b"]
    t = NOW_NS()
    for order in [("team-a", "team-b"), ("team-b", "team-a")]:
        data = tmp_path / "-".join(order)
        data.mkdir()
        ember = make_ember("--shards", "1", "--flush-interval-ms", "3000", data_dir=data)
        # The shard has just flushed: the next pushes share one segment.
        assert ember.push_proto([({"service_name": "warm"}, [with_time(a_raw, t)])], tenant="warm").status_code == 200
        import threading
        results = {}
        threads = [threading.Thread(target=lambda tn=tn, raw=raw: results.setdefault(tn, ember.push_proto(
            [({"__name__": "process_cpu", "service_name": "api"}, [with_time(raw, t)])], tenant=tn)))
            for tn, raw in [("team-a", a_raw), ("team-b", b_raw)]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert all(r.status_code == 200 for r in results.values()), results
        assert len(segment_objects(ember)) == 2, "both tenants' pushes must share one block"
        for _ in range(2):  # cold, then warm caches
            for tenant in order:
                table = ember.sql(f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"api\"}}', 0, {FAR}, 1000000)", tenant)
                total, got, _ = flame_stacks(table)
                assert got == want[tenant], (tenant, order)
                assert total == sum(want[tenant].values())
                n = ember.sql("SELECT count(*) AS n FROM samples WHERE service_name = 'warm'", tenant)
                assert n.column("n")[0].as_py() == 0


def test_profiles_outside_the_ingestion_window_get_400_with_the_reason(make_ember, tmp_path):
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"tenants": {"replay": {"reject_older_than_seconds": 0}}}))
    ember = make_ember("--reject-older-than-seconds", "3600", "--limits-file", str(limits))
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    year = 365 * 24 * 3600 * 10**9
    for nanos, reason in [(1, "reject_older_than"), (NOW_NS() - 2 * 3600 * 10**9, "reject_older_than"),
                          (4_102_444_800 * 10**9, "reject_newer_than"), (NOW_NS() + year, "reject_newer_than")]:
        r = ember.push_proto([({"service_name": "odd"}, [with_time(raw, nanos)])])
        assert r.status_code == 400, r.text
        assert reason in r.json()["message"]
    # One bad profile refuses the whole request: nothing of it is stored.
    r = ember.push_proto([({"service_name": "odd"}, [with_time(raw, NOW_NS()), with_time(raw, 1)])])
    assert r.status_code == 400
    assert ember.push_proto([({"service_name": "now"}, [with_time(raw, NOW_NS())])]).status_code == 200
    # A tenant allowed to replay old profiles.
    assert ember.push_proto([({"service_name": "old"}, [with_time(raw, 1)])], tenant="replay").status_code == 200
    services = {r["service_name"] for r in ember.sql("SELECT DISTINCT service_name FROM samples").to_pylist()}
    assert services == {"now"}
    entries = [m for m in requests.get(f"{ember.http}/metrics").text.splitlines() if m.startswith("ember_push_errors_total")]
    assert entries


def test_a_200000_frame_stack_is_truncated_and_every_query_still_answers(ember):
    normal = with_time((FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes(), NOW_NS())
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "deep"}, [normal])]).status_code == 200
    r = ember.push_proto([({"__name__": "process_cpu", "service_name": "deep"}, [deep_pprof(200_000)])])
    assert r.status_code == 200, r.text
    table = ember.sql(f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"deep\"}}', 0, {FAR}, 1000000)")
    total, got, depth = flame_stacks(table)
    p = load_pprof(normal)
    want = folded(p, profile_types(p, "process_cpu").index(CPU))
    assert total == sum(want.values()) + 7
    deep = [k for k in got if k.endswith("[truncated]")]
    assert len(deep) == 1 and got[deep[0]] == 7
    frames = deep[0].split(";")
    assert len(frames) == 1000 and frames[0] == "f199999" and frames[998] == "f199001"
    assert depth == 1000
    assert {k: v for k, v in got.items() if k not in deep} == want


def test_tenant_ids_accepted_on_push_are_accepted_on_query(ember):
    raw = with_time((FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes(), NOW_NS())
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "api"}, [raw])], tenant="acme.prod").status_code == 200
    n = ember.sql("SELECT count(*) AS n FROM samples", "acme.prod").column("n")[0].as_py()
    assert n > 0
    table = ember.sql(f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"api\"}}', 0, {FAR})", "acme.prod")
    assert table.column("value")[0].as_py() > 0
    for bad in ["../x", "a/b", "a b"]:
        r = ember.push_proto([({"service_name": "api"}, [raw])], tenant=bad)
        assert r.status_code == 400 and "invalid tenant id" in r.json()["message"]
        with pytest.raises(Exception) as e:
            ember.sql("SELECT 1", bad)
        assert "invalid tenant id" in str(e.value)


def test_limits_answer_with_their_names_and_the_server_stays_up(make_ember):
    ember = make_ember("--max-profile-stacktrace-samples", "100", "--max-inflight-bytes", str(1 << 20))
    big = (FIXTURES / "pprof" / "go-heap.pb.gz").read_bytes()
    r = ember.push_proto([({"service_name": "many"}, [big])])
    assert r.status_code == 400 and "max_profile_stacktrace_samples (100)" in r.json()["message"]
    # More bytes than the whole in-flight budget: 429 with Retry-After.
    huge = (FIXTURES / "pprof" / "go-heap-large.pb.gz").read_bytes()
    r = ember.push_proto([({"service_name": "huge"}, [huge])], gzip_body=False)
    assert r.status_code == 429, r.text
    assert r.headers.get("Retry-After") == "1"
    assert "in flight" in r.json()["message"]
    small = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "small"}, [small])]).status_code == 200
    assert ember.alive()


def test_a_tenant_past_its_ingestion_rate_gets_429_and_the_others_are_not_slowed(make_ember, tmp_path):
    limits = tmp_path / "limits.json"
    # 20 KB a second with a 50 KB burst for one tenant; the others unlimited.
    limits.write_text('{"tenants": {"noisy": {"ingestion_rate_mb": 0.02, "ingestion_burst_size_mb": 0.05}}}')
    ember = make_ember("--limits-file", str(limits))
    raw = (FIXTURES / "pprof" / "go-heap.pb.gz").read_bytes()

    def push(tenant, pod):
        labels = {"__name__": "memory", "service_name": "rate", "pod": pod}
        return ember.push_proto([(labels, [raw])], tenant=tenant, gzip_body=False)

    assert push("noisy", "p0").status_code == 200
    refused = push("noisy", "p1")
    assert refused.status_code == 429, refused.text
    assert refused.headers.get("Retry-After")
    message = refused.json()["message"]
    assert "ingestion_rate_mb 0.02" in message and "retry in" in message, message
    for i in range(10):
        assert push("quiet", f"p{i}").status_code == 200
    wait = float(message.split("retry in ")[1].split(" s")[0])
    time.sleep(wait + 0.2)
    assert push("noisy", "p2").status_code == 200
    # What was refused was not stored; what was acknowledged was.
    pods = {t: sorted(r["pod"] for r in ember.sql(
        "SELECT DISTINCT regexp_match(labels, 'pod=\"([^\"]+)')[1] AS pod FROM profiles", tenant=t).to_pylist())
        for t in ["noisy", "quiet"]}
    assert pods == {"noisy": ["p0", "p2"], "quiet": [f"p{i}" for i in range(10)]}, pods


def test_torn_dlq_entries_are_quarantined_and_a_block_in_dlq_twice_counts_once(make_ember, tmp_path):
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    ember = make_ember("--dlq-retry-seconds", "1", data_dir=tmp_path)
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "api"}, [raw])]).status_code == 200
    before = ember.sql("SELECT sum(value) AS v FROM samples").column("v")[0].as_py()
    ember.stop()
    [block] = segment_objects(ember)
    data = block.read_bytes()
    footer_len = int.from_bytes(data[-8:-4], "big")
    # A dlq entry is framed as the block's footer: metadata, length, CRC.
    meta = data[-8 - footer_len:]
    dlq = tmp_path / "objects" / "dlq" / "0"
    dlq.mkdir(parents=True)
    (dlq / "already-registered.meta").write_bytes(meta)
    (dlq / "empty.meta").write_bytes(b"")
    (dlq / "torn.meta").write_bytes(meta[: len(meta) // 2])
    (dlq / "missing-block.meta").write_bytes(bytes(meta).replace(b"block.bin", b"gone.bin"))
    ember = make_ember("--dlq-retry-seconds", "1", data_dir=tmp_path)
    deadline = time.time() + 20
    while time.time() < deadline and any(dlq.iterdir()):
        time.sleep(0.2)
    assert not any(dlq.iterdir())
    quarantined = sorted(p.name for p in (tmp_path / "objects" / "dlq-quarantine").rglob("*.meta"))
    assert quarantined == ["empty.meta", "missing-block.meta", "torn.meta"]
    assert ember.sql("SELECT sum(value) AS v FROM samples").column("v")[0].as_py() == before
    metrics = requests.get(f"{ember.http}/metrics").text
    assert "ember_dlq_quarantined_total 3" in metrics
    # An entry written while the server runs is picked up without a restart.
    (dlq / "late-torn.meta").write_bytes(b"\x0a")
    deadline = time.time() + 20
    while time.time() < deadline and any(dlq.iterdir()):
        time.sleep(0.2)
    assert not any(dlq.iterdir())


def test_sql_stays_in_its_sandbox(ember):
    for sql in ["SELECT * FROM 'file:///etc/passwd'",
                "SELECT * FROM read_csv('/etc/passwd')",
                "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION 'file:///etc/'",
                "CREATE VIEW v AS SELECT 1",
                "COPY (SELECT 1) TO 'file:///tmp/ember-sandbox.csv'",
                "SET datafusion.runtime.memory_limit = '100G'"]:
        with pytest.raises(Exception):
            ember.sql(sql)
    assert ember.alive()


def test_auth_maps_credentials_to_tenants_on_http_and_flight_sql(make_ember, tmp_path):
    import adbc_driver_flightsql.dbapi as flightsql
    import base64
    import pyarrow.flight as pf

    token = "tok-a-0123456789abcdef"
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"tokens": [{"token": token, "tenant": "team-a"}],
                                "users": [{"username": "bob", "password": "s3cret", "tenant": "team-b"}]}))
    ember = make_ember("--auth-file", str(auth))
    raw = with_time((FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes(), NOW_NS())
    url = f"{ember.http}/push.v1.PusherService/Push"
    from wire import push_request
    body = push_request([({"__name__": "process_cpu", "service_name": "api"}, [raw])])
    proto = {"Content-Type": "application/proto"}
    basic = "Basic " + base64.b64encode(b"bob:s3cret").decode()
    r = requests.post(url, data=body, headers=proto)
    assert r.status_code == 401 and "authentication required" in r.json()["message"]
    r = requests.post(url, data=body, headers={**proto, "Authorization": "Bearer wrong-token-000000"})
    assert r.status_code == 401
    r = requests.post(url, data=body, headers={**proto, "Authorization": f"Bearer {token}", "X-Scope-OrgID": "team-b"})
    assert r.status_code == 403
    assert requests.post(url, data=body, headers={**proto, "Authorization": f"Bearer {token}"}).status_code == 200
    # Agents send basic auth; /ingest takes it too.
    r = requests.post(f"{ember.http}/ingest", params={"name": "basic.cpu", "format": "folded"},
                      data=f"main;work {7}\n".encode(), headers={"Authorization": basic})
    assert r.status_code == 200, r.text

    def count(**db_kwargs):
        with flightsql.connect(ember.flight, autocommit=True, db_kwargs=db_kwargs) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT service_name, count(*) AS n FROM samples GROUP BY 1")
                return {r["service_name"]: r["n"] for r in cur.fetch_arrow_table().to_pylist()}

    assert set(count(**{"adbc.flight.sql.authorization_header": f"Bearer {token}"})) == {"api"}
    # The basic-auth handshake answers with a bearer token for bob's tenant.
    assert set(count(username="bob", password="s3cret")) == {"basic"}
    for bad in [{}, {"username": "bob", "password": "nope"},
                {"adbc.flight.sql.authorization_header": "Bearer wrong-token-000000"},
                {"adbc.flight.sql.authorization_header": f"Bearer {token}",
                 "adbc.flight.sql.rpc.call_header.x-scope-orgid": "team-b"}]:
        with pytest.raises(Exception) as e:
            count(**bad)
        assert "unauthenticated" in str(e.value).lower() or "permission" in str(e.value).lower() \
            or "another tenant" in str(e.value).lower() or "unknown" in str(e.value).lower(), str(e.value)
    client = pf.FlightClient(ember.flight)
    with pytest.raises(pf.FlightUnauthenticatedError):
        client.authenticate_basic_token(b"bob", b"wrong")
    header = client.authenticate_basic_token(b"bob", b"s3cret")
    assert header[0].lower() == b"authorization" and header[1].startswith(b"Bearer ")


def test_every_flight_sql_surface_shows_a_tenant_only_its_own(ember):
    import adbc_driver_flightsql.dbapi as flightsql

    raw = with_time((FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes(), NOW_NS())
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "secret"}, [raw])], tenant="team-a").status_code == 200
    r = requests.post(f"{ember.http}/ingest", params={"name": "secret-ingest.cpu", "format": "folded"},
                      data=b"main;hidden 5\n", headers={"X-Scope-OrgID": "team-a"})
    assert r.status_code == 200, r.text

    def connect(tenant):
        return flightsql.connect(ember.flight, autocommit=True,
                                 db_kwargs={"adbc.flight.sql.rpc.call_header.x-scope-orgid": tenant})

    def prepared(conn, sql):
        with conn.cursor() as cur:
            cur.adbc_prepare(sql)
            cur.execute(sql)
            return cur.fetch_arrow_table().to_pylist()

    for tenant, sees in [("team-b", False), ("team-a", True)]:
        with connect(tenant) as conn:
            objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
            schemas = {s["db_schema_name"] for c in objects for s in (c["catalog_db_schemas"] or [])}
            assert schemas == {tenant}, schemas
            tables = {(s["db_schema_name"], t["table_name"]) for c in objects
                      for s in (c["catalog_db_schemas"] or []) for t in (s["db_schema_tables"] or [])}
            assert tables == {(tenant, "samples"), (tenant, "profiles"), (tenant, "stacks")}
            n = prepared(conn, "SELECT count(*) AS n FROM samples")[0]["n"]
            assert (n > 0) == sees
            names = {r["schema_name"] for r in prepared(conn, "SELECT schema_name FROM information_schema.schemata")}
            assert "team-a" not in names or sees
            services = {r["service_name"] for r in prepared(conn, "SELECT DISTINCT service_name FROM profiles")}
            assert services == ({"secret", "secret-ingest"} if sees else set())
            fg = prepared(conn, f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"secret\"}}', 0, {FAR})")
            assert (fg[0]["value"] > 0) == sees


def pprof_bytes(samples, labels_per_sample=0, value=1):
    """A flat cpu pprof: `samples` one-frame samples over 1000 functions."""
    strings = [b"", b"cpu", b"nanoseconds", b"k"] + [f"fn{i}".encode() for i in range(1000)]
    out = [_bytes_field(1, _key(1, 0) + _varint(1) + _key(2, 0) + _varint(2))]
    label = _bytes_field(3, _key(1, 0) + _varint(3) + _key(2, 0) + _varint(4))
    v = _varint(value & (2**64 - 1))
    # 1000 distinct samples, repeated: a list joined once, not bytes += .
    distinct = [_bytes_field(2, _bytes_field(1, _varint(i + 1)) + _bytes_field(2, v) + label * labels_per_sample)
                for i in range(1000)]
    out += [distinct[i % 1000] for i in range(samples)]
    for i in range(1000):
        out.append(_bytes_field(4, _key(1, 0) + _varint(i + 1) + _bytes_field(4, _key(1, 0) + _varint(i + 1))))
        out.append(_bytes_field(5, _key(1, 0) + _varint(i + 1) + _key(2, 0) + _varint(i + 4)))
    out += [_bytes_field(6, s) for s in strings]
    return b"".join(out)


def nested(depth):
    """A message nested `depth` levels deep in field 2 (Sample) of a Profile."""
    inner = b""
    for _ in range(depth):
        inner = _bytes_field(3, inner)
    return _bytes_field(2, inner)


def test_hostile_inputs_get_4xx_with_the_reason_and_harm_no_other_request(make_ember):
    import threading
    ember = make_ember()
    good = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    cases = {
        "a million tiny samples": (gzip.compress(pprof_bytes(1_000_000)), 400, "max_profile_stacktrace_samples"),
        "labels on every sample": (pprof_bytes(10, labels_per_sample=101), 400, "max_profile_stacktrace_sample_labels"),
        "deeply nested protobuf": (nested(5000), 400, "pprof profile"),
        "invalid utf-8 everywhere": (b"\x32\x02\xff\xfe" * 1000, 400, ""),
    }
    results = {}
    good_thread = threading.Thread(target=lambda: results.setdefault(
        "good", ember.push_proto([({"__name__": "process_cpu", "service_name": "good"}, [good])])))
    good_thread.start()
    for name, (raw, status, reason) in cases.items():
        started = time.time()
        r = ember.push_proto([({"service_name": "hostile"}, [raw])])
        assert r.status_code == status, (name, r.status_code, r.text)
        assert reason in r.json()["message"], (name, r.json()["message"])
        assert time.time() - started < 20, name
    # Negative values (real agents send them across restarts) are dropped
    # as Pyroscope drops them: the push is acknowledged, nothing is stored.
    r = ember.push_proto([({"service_name": "negative"}, [pprof_bytes(10, value=-5)])])
    assert r.status_code == 200, r.text
    # 100 k labels on one series.
    many = {f"l{i}": "v" for i in range(100_000)}
    many["service_name"] = "hostile"
    r = ember.push_proto([(many, [good])])
    assert r.status_code in (400, 413), r.text
    assert "limit" in r.json()["message"]
    good_thread.join()
    assert results["good"].status_code == 200
    services = {r["service_name"] for r in ember.sql("SELECT DISTINCT service_name FROM samples").to_pylist()}
    assert services == {"good"}
    assert ember.alive()
