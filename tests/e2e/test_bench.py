"""`ember-bench` end to end on a small workload: it must push, query and run
the peers on the same data, and every figure it reports must agree with the
others (stored totals, flame graph roots, peer totals)."""

import json
import pathlib
import subprocess
import sys

from conftest import BIN, FIXTURES, ROOT


def test_bench_small_run_is_consistent(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run(
        [str(BIN.with_name("ember-bench")), "--ember", str(BIN), "--out", str(out), "--fixtures", str(FIXTURES),
         "--samples", "150000", "--scales", "10000,30000", "--clients", "8",
         "--repeats", "2", "--mixed-seconds", "2", "--lone-pushes", "3",
         "--metastore-blocks", "2000", "--python", sys.executable,
         "--label-series", "3000",
         "--production-series", "4", "--production-minutes", "2", "--compaction-jobs", "20000:500",
         # Small thresholds: level 2 within seconds, not after the 12 min L1 age.
         "--production-compaction-levels", "3:1,4:2",
         "--peers-script", str(ROOT / "benches" / "e2e" / "peers.py")],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())

    w, ingest = report["workload"], report["ingest"]
    assert w["stored_samples"] >= 150000
    assert ingest["failures"] == 0
    assert ingest["under_load"]["count"] == w["requests"]
    assert ingest["puts"] >= 1 and ingest["flushes"] >= 1
    assert report["storage"]["object_bytes"] > 0

    flame = {q["name"]: q for q in report["flame_queries"]}
    assert any(q["service_name"] for q in flame.values())
    assert {"all services, 10k samples", "all services, 30k samples"} <= set(flame)
    for q in report["queries"]:
        if q["name"] in flame:
            assert q["root_total"] == flame[q["name"]]["total"], q["name"]
            assert q["samples"] == flame[q["name"]]["samples"]
    # A query of the whole range reads what the store holds, from a cold start.
    whole = next(q for q in report["queries"] if q["name"] == "all services, whole range")
    assert whole["cold_gets"] >= 1 and whole["cold_read_bytes"] > 0
    # Cold is the median of one run per restart, as many as the repeats.
    assert len(whole["cold_runs_ms"]) == 2
    assert whole["cold_ms"] == sorted(whole["cold_runs_ms"])[1]

    engines = {(p["engine"], p["shape"], p["kind"]) for p in report["peers"]}
    assert ("duckdb", "normalised", "group_by") in engines
    assert ("chdb", "denormalised", "tree") in engines
    assert ("datafusion", "normalised", "group_by") in engines
    for p in report["peers"]:
        assert p["total"] == flame[p["query"]]["total"], p

    assert report["mixed"]["alone"]["count"] > 0 and report["mixed"]["with_queries"]["count"] > 0
    limit = report["memory_limit"]
    assert "Resources exhausted" in (limit["error"] or ""), limit
    assert limit["healthy_after"] and limit["small_query_after"]
    assert report["metastore"][0]["blocks"] == 2000
    assert report["metastore"][0]["datasets_found"] > 0
    # The production shape: level 0 as pushed, then compacted (the bench
    # itself checks each flame graph's root against the stored total).
    prod = report["production"]
    assert prod["requests"] == 4 * 12
    assert prod["level0"]["blocks_by_level"].get("0", 0) >= 1
    assert "0" not in prod["compacted"]["blocks_by_level"]
    assert prod["compacted"]["objects"] < prod["level0"]["objects"]
    assert {p["engine"] for p in prod["peers"]} >= {"duckdb", "chdb", "datafusion"}
    [job] = report["compaction_jobs"]
    assert job["samples"] == 20000 and job["peak_rss_bytes"] > 0 and job["output_bytes"] > 0
    # Pyroscope's query API over each flame graph range: totals are checked
    # by the bench against the stored ones, and reported.
    for q in flame.values():
        if q["service_name"] is None:
            for method in ["SelectMergeStacktraces", "SelectMergeProfile", "SelectSeries by service"]:
                run = next(r for r in report["queries"] if r["name"] == f"{q['name']}: {method}")
                assert run["root_total"] == q["total"] and run["rows"] > 0, run
                assert run["sql"].startswith("POST /querier.v1.QuerierService/")
    labels = {r["name"]: r for r in report["label_queries"]}
    assert labels["LabelValues pod over 3000 series"]["rows"] == 3000
    assert labels["LabelValues service_name over 3000 series"]["rows"] == 100
    assert labels["LabelValues pod of one service over 3000 series"]["rows"] == 30
    assert labels["Series of one service over 3000 series"]["rows"] >= 30
    markdown = (out / "report.md").read_text()
    assert "## Peers on the same data" in markdown and "## Label calls over many series" in markdown
    if pathlib.Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists():
        assert (out / "charts" / "flamegraph_scaling.png").stat().st_size > 1000


def test_bench_history_compacts_what_it_writes_and_answers_its_totals(tmp_path):
    """`--history-only` writes an hour without pushing it, compacts it
    offline to the top level, and the server it starts answers the flame
    graph with the generated total, with and without slow GETs."""
    out = tmp_path / "history"
    run = subprocess.run(
        [str(BIN.with_name("ember-bench")), "--ember", str(BIN), "--out", str(out), "--fixtures", str(FIXTURES),
         "--history-only", "--history-hours", "1", "--production-series", "8", "--interval-s", "15",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "history.json").read_text())
    assert report["profiles"] == 8 * 240
    levels = report["blocks_by_level"]
    assert "0" not in levels and "1" not in levels and levels.get("2", 0) >= 1, levels
    # Retired sources are deleted: the store holds the indexed blocks alone.
    assert report["objects"] == sum(levels.values())
    [hour] = report["ranges"]
    q = hour["query"]
    assert q["total"] > 0 and q["samples"] > 0
    for measured in [hour["local"], hour["cloud"]]:
        assert measured["root_total"] == q["total"], measured
        assert measured["cold_gets"] >= 1
    # Every GET of the second server waited its 30 ms.
    assert hour["cloud"]["cold_ms"] >= 30
    assert hour["cloud"]["cold_gets"] == hour["local"]["cold_gets"]
