"""Ember on an S3 bucket (moto's S3 server on loopback), configured as the
object_store crate's users configure it: its AWS_* environment variables.
The write, query, compaction, retention and SIGKILL tests run on both the
local store and S3 (their `store` parameter); this file checks what only
the configuration decides."""

import subprocess

from conftest import BIN, FIXTURES, S3Store, free_port

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
