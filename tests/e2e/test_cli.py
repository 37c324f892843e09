"""The command line against the real server: `ember ingest` pushes files
and directories with a summary, `ember query` prints table, CSV and JSON,
`ember flamegraph` prints the top of a flame graph or writes an SVG; each
checked against what SQL says."""

import csv
import io
import json
import shutil
import subprocess

from conftest import BIN, FIXTURES, flame_stacks
from wire import folded, load_pprof, profile_types

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
FAR = "9999999999999"


def ember_cli(ember, *args, check=True):
    env = {"EMBER_URL": ember.http, "EMBER_FLIGHT_URL": f"http://127.0.0.1:{ember.flight_port}",
           "EMBER_TENANT": "cli", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_ingest_then_query_and_flamegraph(ember, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(FIXTURES / "pprof" / "go-cpu.pb.gz", profiles / "a.pb.gz")
    (profiles / "b.folded").write_text("main;work;spin 30\nmain;io 12\n")
    (profiles / "notes.md").write_text("not a profile")
    out = ember_cli(ember, "ingest", "--service", "api", "--label", "pod=p1", str(profiles))
    assert "pushed 2 of 2 files" in out.stderr and "skipped" in out.stderr and "notes.md" in out.stderr

    rows = ember_cli(ember, "query", "--format", "csv",
                     "SELECT profile_type, sum(value) AS v FROM samples GROUP BY 1 ORDER BY 1").stdout
    got = {r["profile_type"]: int(r["v"]) for r in csv.DictReader(io.StringIO(rows))}
    src = load_pprof((FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes())
    index = profile_types(src, "process_cpu").index(CPU)
    assert got[CPU] == sum(folded(src, index).values())
    # A folded file counts samples of `cpu` (the name's default kind), as the
    # pprof's own sample counts do: both land in one type.
    samples = "process_cpu:samples:count:cpu:nanoseconds"
    assert got[samples] == sum(folded(src, profile_types(src, "process_cpu").index(samples)).values()) + 42
    lines = ember_cli(ember, "query", "--format", "json",
                      "SELECT DISTINCT labels FROM profiles").stdout.splitlines()
    assert all('pod="p1"' in json.loads(line)["labels"] for line in lines) and lines
    table = ember_cli(ember, "query", "SELECT count(*) AS n FROM profiles").stdout
    assert "| n" in table

    tree = ember_cli(ember, "flamegraph", "--type", CPU, "--service", "api", "--from", "0",
                     "--until", FAR, "--top", "12").stdout.splitlines()
    assert tree[0].split()[0] == "100.00%" and tree[0].endswith("total")
    kept = [line for line in tree[1:] if line.split()[-1] != "other"]
    assert 1 < len(kept) <= 12  # the top nodes; the rest summed into `other`
    svg = tmp_path / "cpu.svg"
    ember_cli(ember, "flamegraph", "--type", CPU, "--service", "api", "--from", "0", "--until", FAR,
              "--svg", str(svg))
    text = svg.read_text()
    _, stacks, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"api\"}}', 0, {FAR})", tenant="cli"))
    leaf = max(stacks, key=stacks.get).split(";")[-1]
    assert text.startswith("<?xml") and leaf in text


def test_ingest_reports_refused_files_and_fails(ember, tmp_path):
    bad = tmp_path / "broken.pb.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    out = ember_cli(ember, "ingest", "--service", "api", str(bad), check=False)
    assert out.returncode != 0
    assert "refused" in out.stderr and "broken.pb.gz" in out.stderr and "HTTP 400" in out.stderr
    out = ember_cli(ember, "ingest", "--service", "api", "--label", "oops", str(bad), check=False)
    assert out.returncode != 0 and "key=value" in out.stderr


def test_ingest_pushes_jfr_recordings(ember, tmp_path):
    jfr = tmp_path / "kafka-cpu.jfr.gz"
    shutil.copy(FIXTURES / "jfr" / "kafka-cpu.jfr.gz", jfr)
    out = ember_cli(ember, "ingest", "--service", "kafka", "--label", "env=ci", str(jfr))
    assert "pushed 1 of 1 files" in out.stderr
    want = folded(load_pprof((FIXTURES / "jfr" / "kafka-cpu.expected.process_cpu.pb.gz").read_bytes()), 0)
    total, stacks, _ = flame_stacks(ember.sql(
        f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"kafka\", env=\"ci\"}}', 0, {FAR})", tenant="cli"))
    assert stacks == want and total == sum(want.values())
