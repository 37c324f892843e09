"""Memory under a flood: many clients pushing large profiles at once meet
the in-flight byte budget (429 with Retry-After), and the server's memory
plateaus instead of growing with the load."""

import pathlib
import statistics
import threading
import time

import requests

from conftest import FIXTURES

BIG = (FIXTURES / "pprof" / "go-heap-large.pb.gz").read_bytes()


def rss_mb(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_flood_of_large_pushes_meets_backpressure_and_memory_plateaus(make_ember):
    ember = make_ember("--max-inflight-bytes", str(24 << 20))
    stop = threading.Event()
    statuses, lock = {}, threading.Lock()

    def flood(worker):
        i = 0
        while not stop.is_set():
            labels = {"__name__": "memory", "service_name": "flood", "pod": f"p{worker}"}
            try:
                r = ember.push_proto([(labels, [BIG])], gzip_body=False, timeout=60)
            except requests.RequestException:
                continue
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 429:
                assert r.headers.get("Retry-After") == "1"
                time.sleep(0.05)
            i += 1

    threads = [threading.Thread(target=flood, args=(w,)) for w in range(24)]
    for t in threads:
        t.start()
    samples = []
    started = time.time()
    while time.time() - started < 20:
        samples.append(rss_mb(ember.proc.pid))
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert ember.alive()
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0, statuses
    assert set(statuses) <= {200, 429}, statuses
    half = len(samples) // 2
    early, late = max(samples[:half]), max(samples[half:])
    print(f"flood: {statuses}, peak RSS {max(samples):.0f} MB, first half max {early:.0f} MB, "
          f"second half max {late:.0f} MB, median {statistics.median(samples):.0f} MB")
    # Bounded, and not growing: the second half peaks near the first.
    assert max(samples) < 1536
    assert late < early * 1.5 + 64
    r = ember.push_proto([({"__name__": "memory", "service_name": "after"}, [(FIXTURES / "pprof" / "go-heap.pb.gz").read_bytes()])])
    assert r.status_code == 200


def test_a_push_that_waits_too_long_for_a_decoder_is_refused_and_every_acknowledged_one_is_stored(make_ember):
    # Backpressure by time: with a 1 ms bound on the wait for a decoder, a
    # burst wider than the decoders is partly refused, each refusal a 429
    # with its reason and Retry-After, and nothing acknowledged goes missing.
    ember = make_ember("--max-push-queue-ms", "1")
    statuses, refusals, lock = {}, [], threading.Lock()

    def burst(worker, round_):
        labels = {"__name__": "memory", "service_name": "burst", "pod": f"p{round_}-{worker}"}
        r = ember.push_proto([(labels, [BIG])], gzip_body=False, timeout=60)
        with lock:
            statuses.setdefault(r.status_code, []).append(labels["pod"])
            if r.status_code == 429:
                refusals.append((r.headers.get("Retry-After"), r.json()))

    for round_ in range(5):
        threads = [threading.Thread(target=burst, args=(w, round_)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if refusals:
            break
    assert set(statuses) <= {200, 429}, {k: len(v) for k, v in statuses.items()}
    assert refusals, "no burst was wide enough to be refused"
    for retry_after, body in refusals:
        assert retry_after == "1"
        assert body["code"] == "resource_exhausted" and "at capacity" in body["message"], body
    stored = set(ember.sql("SELECT value FROM label_values('pod', '{service_name=\"burst\"}', 0, 9999999999999)")
                 .column("value").to_pylist())
    acked = set(statuses.get(200, []))
    assert acked and stored == acked, (len(acked), len(stored))
