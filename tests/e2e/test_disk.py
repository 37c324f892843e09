"""A full disk and a read-only data directory: clients get a clear error
(503 with the reason), the log says so, nothing acknowledged is lost, and
the server recovers by itself when the disk does. The data directory is a
small tmpfs mounted for the test (the CI machine runs tests as root)."""

import contextlib
import pathlib
import subprocess
import time
import uuid

import pytest
import requests

from conftest import FIXTURES

RAW = (FIXTURES / "pprof" / "go-heap.pb.gz").read_bytes()
SUM_SQL = "SELECT labels, sum(value) AS v FROM samples WHERE profile_type = 'memory:inuse_space:bytes:space:bytes' GROUP BY 1"


@contextlib.contextmanager
def small_disk(size):
    mnt = pathlib.Path(f"/tmp/ember-disk-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
        mnt.rmdir()


def push(ember, seq):
    labels = {"__name__": "memory", "service_name": "disk", "seq": str(seq)}
    return ember.push_proto([(labels, [RAW])], timeout=30)


def stored(ember):
    return {r["labels"].split('seq="')[1].split('"')[0]: r["v"] for r in ember.sql(SUM_SQL).to_pylist()}


def test_a_full_disk_gets_503_with_the_reason_and_recovers_when_space_returns(make_ember):
    with small_disk("24m") as mnt:
        ember = make_ember(data_dir=mnt)
        assert push(ember, "first").status_code == 200
        one = stored(ember)["first"]
        # Leave a little room, then fill it.
        free = subprocess.run(["df", "--output=avail", "-B1", str(mnt)], capture_output=True, text=True)
        avail = int(free.stdout.split()[-1])
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * max(avail - 600_000, 0))
        acked, refused = ["first"], []
        for i in range(200):
            r = push(ember, i)
            if r.status_code == 200:
                acked.append(str(i))
                continue
            assert r.status_code == 503, r.text
            assert "space" in r.json()["message"].lower(), r.json()["message"]
            assert r.headers.get("Retry-After") == "1"
            refused.append(str(i))
            if len(refused) >= 3:
                break
        assert refused, "the disk never filled"
        assert ember.alive()
        assert requests.get(f"{ember.http}/ready").status_code == 200
        metrics = requests.get(f"{ember.http}/metrics").text
        failures = [m for m in metrics.splitlines() if m.startswith("ember_segment_flush_failures_total ")]
        assert failures and float(failures[0].split()[1]) >= 1
        filler.unlink()
        deadline = time.time() + 30
        while time.time() < deadline:
            r = push(ember, "after")
            if r.status_code == 200:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        acked.append("after")
        got = stored(ember)
        assert all(got.get(s) == one for s in acked), {s: got.get(s) for s in acked}
        ember.stop()
        ember = make_ember(data_dir=mnt)
        got = stored(ember)
        assert all(got.get(s) == one for s in acked)
        ember.stop()


def test_a_read_only_data_directory_gets_503_and_recovers_when_writable(make_ember):
    with small_disk("64m") as mnt:
        ember = make_ember(data_dir=mnt)
        assert push(ember, "rw").status_code == 200
        # A read-only bind mount over the data directory: every new file
        # Ember opens there is refused (EROFS), as on a volume gone read-only.
        subprocess.run(["mount", "--bind", str(mnt), str(mnt)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=True)
        try:
            r = push(ember, "ro")
            assert r.status_code == 503, r.text
            assert "read-only" in r.json()["message"].lower(), r.json()["message"]
            assert ember.alive()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            r = push(ember, "rw-again")
            if r.status_code == 200:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        got = stored(ember)
        assert set(got) >= {"rw", "rw-again"}
        assert "ro" not in got
        ember.stop()
