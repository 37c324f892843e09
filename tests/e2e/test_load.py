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
