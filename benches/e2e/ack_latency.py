"""Ack latency of a lone client pushing to an idle Ember, one push at a time.

    .venv/bin/python benches/e2e/ack_latency.py [--bin target/release/ember] [--pushes 100]

Starts the binary on free ports with a temporary data dir, pushes a recorded
Go CPU profile over push.v1 (Connect, gzip) and reports p50/p90/p99 of the
time to the 200 response, i.e. until the segment is in the object store and
indexed by the metastore."""

import argparse
import gzip
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import requests  # noqa: E402

import conftest  # noqa: E402
from wire import push_request  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "ember"))
    ap.add_argument("--pushes", type=int, default=100)
    ap.add_argument("--gap-ms", type=float, default=600,
                    help="pause between pushes; above the 500 ms flush cap, every push finds its shard idle")
    args = ap.parse_args()
    conftest.BIN = pathlib.Path(args.bin)
    raw = (conftest.FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    with tempfile.TemporaryDirectory() as d:
        ember = conftest.Ember(pathlib.Path(d)).start()
        session = requests.Session()
        latencies = []
        try:
            for i in range(args.pushes):
                body = gzip.compress(push_request([({"__name__": "process_cpu", "service_name": "lone", "seq": str(i)}, [raw])]))
                t0 = time.perf_counter()
                r = session.post(f"{ember.http}/push.v1.PusherService/Push", data=body,
                                 headers={"Content-Type": "application/proto", "Content-Encoding": "gzip"})
                latencies.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
                time.sleep(args.gap_ms / 1000)
                if (i + 1) % 25 == 0:
                    print(f"  {i + 1}/{args.pushes} pushes", file=sys.stderr)
        finally:
            ember.stop()
    q = statistics.quantiles(latencies, n=100)
    print(f"lone push ack latency over {len(latencies)} pushes: p50 {q[49]:.1f} ms, p90 {q[89]:.1f} ms, p99 {q[98]:.1f} ms")


if __name__ == "__main__":
    main()
