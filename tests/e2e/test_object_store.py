"""Ember on an S3 bucket (moto's S3 server on loopback), configured as the
object_store crate's users configure it: its AWS_* environment variables.
The write, query, compaction, retention and SIGKILL tests run on both the
local store and S3 (their `store` parameter); this file checks what only
the configuration decides."""

import signal
import subprocess
import threading
import time

from conftest import BIN, FIXTURES, MOTO_PROCESSES, S3Store, free_port
from wire import load_pprof, totals

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
RAW = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()


def test_the_environment_configures_the_bucket_and_no_secret_is_logged(make_ember, moto, tmp_path):
    store = S3Store(moto)
    env = {k.upper(): v for k, v in store.options.items()}
    url_only = type("UrlOnly", (), {"args": lambda self: ["--object-store-url", store.url()],
                                    "keys": lambda self, prefix="": store.keys(prefix)})()
    ember = make_ember(store=url_only, env=env)
    labels = {"__name__": "process_cpu", "service_name": "on-s3", "pod": "p1"}
    assert ember.push_proto([(labels, [RAW])], tenant="t").status_code == 200
    blocks = [k for k in store.keys("segments/") if k.endswith("block.bin")]
    assert blocks, store.keys()
    assert not (tmp_path / "objects").exists(), "nothing goes to the local directory"
    total = ember.sql(f"SELECT sum(value) AS v FROM samples WHERE profile_type = '{CPU}'", tenant="t")
    assert total.to_pylist()[0]["v"] > 0
    ember.stop()
    log = (tmp_path / "ember.log").read_text()
    assert store.bucket in log and "test-secret" not in log


def run_refused(tmp_path, *args):
    r = subprocess.run([str(BIN), "serve", "--data-dir", str(tmp_path), "--http-addr", f"127.0.0.1:{free_port()}",
                        "--flight-addr", f"127.0.0.1:{free_port()}", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    return r.stderr + r.stdout


def test_a_bad_store_url_or_option_is_refused_at_start_with_the_reason(tmp_path):
    out = run_refused(tmp_path, "--object-store-url", "ftp://host/blocks")
    assert "scheme \"ftp\"" in out, out
    out = run_refused(tmp_path, "--object-store-url", "s3://key:hunter2@bucket/x")
    assert "credentials" in out and "hunter2" not in out, out
    out = run_refused(tmp_path, "--object-store-url", "s3://bucket/x", "--object-store-option", "aws_secret_access_key")
    assert "key=value" in out, out


def test_an_s3_outage_acknowledges_only_what_is_stored(make_ember, moto):
    """The S3 server stops answering (SIGSTOP) for 8 s in the middle of
    ingest: pushes wait or are refused; none is acknowledged unless stored;
    ingest goes on once S3 answers again."""
    store = S3Store(moto)
    ember = make_ember(store=store)
    per_profile = totals(load_pprof(RAW), "process_cpu")[CPU]
    outcomes = []

    def push_all():
        for i in range(30):
            labels = {"__name__": "process_cpu", "service_name": "outage", "pod": f"p{i}"}
            try:
                outcomes.append(ember.push_proto([(labels, [RAW])], tenant="t", timeout=60).status_code)
            except Exception as e:  # a client timeout is a refusal too
                outcomes.append(repr(e))
            time.sleep(0.2)

    pusher = threading.Thread(target=push_all)
    pusher.start()
    while len(outcomes) < 5:
        time.sleep(0.05)
    moto_proc = MOTO_PROCESSES[moto]
    moto_proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(8)
    finally:
        moto_proc.send_signal(signal.SIGCONT)
    pusher.join(timeout=300)
    assert not pusher.is_alive()
    print("outcomes", outcomes)
    acknowledged = outcomes.count(200)
    refused = [o for o in outcomes if o != 200]
    assert all(o in (429, 500, 503) or isinstance(o, str) for o in refused), outcomes
    assert acknowledged >= 20, outcomes

    def total():
        t = ember.sql(f"SELECT sum(value) AS v FROM samples WHERE profile_type = '{CPU}'", tenant="t")
        return t.to_pylist()[0]["v"] or 0
    deadline = time.time() + 60
    while total() < acknowledged * per_profile and time.time() < deadline:
        time.sleep(0.5)
    stored = total()
    # Every acknowledged profile is stored; a refused one may be too (its
    # agent would retry, and compaction drops the duplicate).
    assert acknowledged * per_profile <= stored <= len(outcomes) * per_profile, (outcomes, stored)
    assert stored % per_profile == 0
    # After the outage, ingest goes on.
    labels = {"__name__": "process_cpu", "service_name": "outage", "pod": "after"}
    assert ember.push_proto([(labels, [RAW])], tenant="t").status_code == 200
