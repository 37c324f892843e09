"""JFR in, as the pyroscope-java agent sends it to /ingest?format=jfr (the
raw recording, or multipart with its context labels), flame graphs out over
Flight SQL equal to the profiles Pyroscope made of the same recordings
(`*.expected.*.pb.gz`: stacks and totals)."""

import gzip

import requests

from conftest import FIXTURES, flame_stacks
from wire import folded, load_pprof

JFR = FIXTURES / "jfr"
FAR = 9_999_999_999_999
CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"


def ingest(ember, name, body=None, files=None, tenant="t", **params):
    return requests.post(f"{ember.http}/ingest", timeout=60, data=body, files=files,
                         params={"name": name, "format": "jfr", "spyName": "javaspy", **params},
                         headers={"X-Scope-OrgID": tenant})


def flame(ember, profile_type, selector, tenant="t"):
    return flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{profile_type}', '{selector}', 0, {FAR}, 1000000)", tenant=tenant))


def test_raw_recording_matches_pyroscope(ember):
    # The agent sends the recording as it is; a gzipped one is read too.
    r = ingest(ember, "kafka", gzip.decompress((JFR / "kafka-cpu.jfr.gz").read_bytes()))
    assert r.status_code == 200, r.text
    want = folded(load_pprof((JFR / "kafka-cpu.expected.process_cpu.pb.gz").read_bytes()), 0)
    total, got, _ = flame(ember, CPU, '{service_name="kafka"}')
    assert got == want and total == sum(want.values()) == 4_780_000_000
    labels = ember.sql("SELECT DISTINCT labels FROM profiles", tenant="t").column("labels").to_pylist()
    assert any('jfr_event="cpu"' in str(x) and 'pyroscope_spy="javaspy"' in str(x) for x in labels), labels


def test_every_event_kind_of_a_recording_matches_pyroscope(ember):
    r = ingest(ember, "kafka", (JFR / "kafka-cpu-lock-alloc.jfr.gz").read_bytes())
    assert r.status_code == 200, r.text
    for profile_type, file in [
        (CPU, "kafka-cpu-lock-alloc.expected.process_cpu_cpu_nanoseconds_cpu_nanoseconds.pb.gz"),
        ("memory:alloc_in_new_tlab_objects:count:space:bytes",
         "kafka-cpu-lock-alloc.expected.memory_alloc_in_new_tlab_objects_count_space_bytes.pb.gz"),
        ("memory:alloc_in_new_tlab_bytes:bytes:space:bytes",
         "kafka-cpu-lock-alloc.expected.memory_alloc_in_new_tlab_bytes_bytes_space_bytes.pb.gz"),
    ]:
        want = folded(load_pprof((JFR / file).read_bytes()), 0)
        total, got, _ = flame(ember, profile_type, '{service_name="kafka"}')
        assert got == want, profile_type
        assert total == sum(want.values()) > 0


def test_multipart_with_context_labels_splits_series_by_thread(ember):
    files = {"jfr": ("jfr", (JFR / "dump2.jfr.gz").read_bytes()),
             "labels": ("labels", (JFR / "dump2.labels.pb.gz").read_bytes())}
    r = ingest(ember, "app{env=ci}", files=files, tenant="j")
    assert r.status_code == 200, r.text
    wall = "wall:wall:nanoseconds:wall:nanoseconds"
    assert flame(ember, wall, '{service_name="app"}', "j")[0] == 147_230_000_000
    assert flame(ember, CPU, '{service_name="app"}', "j")[0] == 33_580_000_000
    assert flame(ember, wall, '{thread_name="pool-2-thread-1", env="ci"}', "j")[0] == 4_350_000_000
    threads = ember.sql("SELECT value FROM label_values('thread_name', '{}', 0, 9999999999999)",
                        tenant="j").column("value").to_pylist()
    assert {f"pool-2-thread-{i}" for i in range(1, 9)} <= set(threads)
    # Another tenant sees none of it.
    assert flame(ember, wall, "{}", "t")[0] == 0


def test_bad_recordings_get_400_with_the_reason_and_harm_nothing(ember):
    raw = gzip.decompress((JFR / "kafka-cpu.jfr.gz").read_bytes())
    for body, why in [(raw[: len(raw) // 2], "JFR"), (b"not a recording", "JFR"), (b"", "empty")]:
        r = ingest(ember, "bad", body)
        assert r.status_code == 400 and why in r.json()["message"], r.text
    r = ingest(ember, "bad", files={"labels": ("labels", b"x")})
    assert r.status_code == 400 and "jfr" in r.json()["message"]
    r = ingest(ember, "bad", files={"jfr": ("jfr", raw), "labels": ("labels", b"\xff\xff")})
    assert r.status_code == 400 and "labels" in r.json()["message"]
    assert ember.sql("SELECT count(*) AS n FROM profiles", tenant="t").column("n")[0].as_py() == 0
    assert ingest(ember, "good", raw).status_code == 200
    assert flame(ember, CPU, '{service_name="good"}')[0] == 4_780_000_000
