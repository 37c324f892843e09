"""Acknowledged means durable: SIGKILL at any moment loses nothing acked.
And a real profiling agent works against Ember unchanged."""

import subprocess
import sys
import textwrap
import threading
import time

import requests

from conftest import FIXTURES, Ember

FAR = 9_999_999_999_999


def test_sigkill_loses_no_acknowledged_profile(tmp_path, store):
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    ember = Ember(tmp_path, store=store).start()
    acked, stop = [], threading.Event()

    def pusher(worker):
        seq = 0
        while not stop.is_set():
            labels = {"__name__": "process_cpu", "service_name": "durable", "seq": f"{worker}-{seq}"}
            try:
                r = ember.push_proto([(labels, [raw])], json=False)
            except requests.RequestException:
                break
            if r.status_code == 200:
                acked.append(f"{worker}-{seq}")
            seq += 1

    threads = [threading.Thread(target=pusher, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    ember.kill()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) > 10, "the pushers should have been acknowledged many times"

    ember.start()
    try:
        rows = ember.sql("SELECT DISTINCT labels FROM samples WHERE service_name = 'durable'").column("labels").to_pylist()
        stored = {l.split('seq="')[1].split('"')[0] for l in rows}
        missing = set(acked) - stored
        assert not missing, f"{len(missing)} acknowledged profiles lost: {sorted(missing)[:5]}"
        # Every stored profile is whole: one profile row per seq and its total.
        per_seq = ember.sql("SELECT labels, count(*) AS n, sum(total) AS t FROM profiles "
                            "WHERE service_name = 'durable' AND profile_type = 'process_cpu:cpu:nanoseconds:cpu:nanoseconds' "
                            "GROUP BY labels").to_pylist()
        totals = {r["t"] // r["n"] for r in per_seq}
        assert len(totals) == 1
    finally:
        ember.stop()


AGENT = textwrap.dedent("""
    import sys, time
    import pyroscope
    pyroscope.configure(application_name="agent-e2e", server_address=sys.argv[1], sample_rate=100, tags={"env": "ci"})

    def ember_busy_leaf():
        x = 0
        for i in range(100000):
            x += i * i
        return x

    def ember_outer_loop(seconds):
        end = time.time() + seconds
        while time.time() < end:
            ember_busy_leaf()

    ember_outer_loop(float(sys.argv[2]))
    pyroscope.shutdown()
""")


def test_pyroscope_io_agent_profiles_show_in_flamegraph(ember, tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    subprocess.run([sys.executable, str(script), ember.http, "6"], check=True, timeout=120)
    deadline = time.time() + 20
    labels = []
    while time.time() < deadline:
        types = ember.sql("SELECT DISTINCT profile_type FROM samples WHERE service_name = 'agent-e2e'").column("profile_type").to_pylist()
        if types:
            pt = types[0]
            t = ember.sql(f"SELECT * FROM flamegraph('{pt}', '{{service_name=\"agent-e2e\", env=\"ci\"}}', 0, {FAR})")
            labels = t.column("label").to_pylist()
            if any("ember_busy_leaf" in l for l in labels):
                break
        time.sleep(1)
    assert any("ember_busy_leaf" in l for l in labels), labels[:50]
    assert any("ember_outer_loop" in l for l in labels)
