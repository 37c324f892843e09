"""Compaction in the real server: what agents pushed is merged into blocks
of higher levels, every answer stays the same, the level-0 objects go, and
a crash at any step of a job loses nothing and doubles nothing."""

import re
import subprocess
import time

import pytest
import requests

from conftest import BIN, FIXTURES, Ember, flame_stacks, free_port

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
RAW = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
# Small thresholds so that a test sees every level: 3 blocks or 1 s at
# level 0, 4 blocks or 2 s at level 1; retired objects go after 1 s.
FAST = ["--compaction-levels", "3:1,4:2", "--compaction-delete-delay-seconds", "1"]
FAR = 9_999_999_999_999


def push(ember, tenant, pod, raw=RAW):
    labels = {"__name__": "process_cpu", "service_name": "api", "pod": pod}
    r = ember.push_proto([(labels, [raw])], tenant=tenant)
    assert r.status_code == 200, r.text


def metric_values(ember, name):
    """{labels text: value} of one metric family."""
    text = requests.get(f"{ember.http}/metrics", timeout=10).text
    out = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def wait_compacted(ember, timeout=90):
    """Until every block is at the top level (2 with FAST), no job is left,
    and no level-0 object either."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        blocks = metric_values(ember, "ember_blocks")
        jobs = sum(metric_values(ember, "ember_compaction_jobs").values())
        left = [k for k in ember.store.keys("segments/") if k.endswith("block.bin")]
        if blocks and set(blocks) == {'{level="2"}'} and jobs == 0 and not left:
            return blocks
        time.sleep(0.25)
    raise AssertionError(f"not compacted: {metric_values(ember, 'ember_blocks')}")


def answers(ember, tenant):
    flame = ember.sql(f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"api\"}}', 0, {FAR}, 1000000)",
                      tenant=tenant)
    pod = ember.sql(f"SELECT * FROM flamegraph('{CPU}', '{{service_name=\"api\", pod=\"p1\"}}', 0, {FAR}, 1000000)",
                    tenant=tenant)
    totals = ember.sql("SELECT labels, profile_type, count(*) AS n, sum(value) AS v FROM samples "
                       "GROUP BY 1, 2 ORDER BY 1, 2", tenant=tenant).to_pylist()
    profiles = ember.sql("SELECT labels, time, total FROM profiles ORDER BY 1, 2, 3", tenant=tenant).to_pylist()
    return flame_stacks(flame), flame_stacks(pod), totals, profiles


def test_compaction_keeps_every_answer_and_retires_level0_objects(make_ember, tmp_path, store):
    # Two tenants push the same service to the same shards; nothing compacts yet.
    ember = make_ember("--compaction-workers", "0", *FAST, data_dir=tmp_path, store=store)
    for i in range(5):
        for tenant in ["team-a", "team-b"]:
            push(ember, tenant, f"p{i}")
    # A retried push: the same profile stored twice.
    push(ember, "team-a", "p1")
    before = {t: answers(ember, t) for t in ["team-a", "team-b"]}
    level0 = metric_values(ember, "ember_blocks")['{level="0"}']
    assert level0 >= 5
    ember.stop()

    # Two workers: the first takes only level-0 jobs, so the level-1 jobs
    # that reach level 2 are the other's.
    ember = make_ember("--compaction-workers", "2", *FAST, data_dir=tmp_path, store=store)
    blocks = wait_compacted(ember)
    assert sum(blocks.values()) <= 2, blocks  # one block per tenant at the top
    assert metric_values(ember, "ember_compaction_profiles_deduplicated_total")[""] >= 1
    # One lag per source block of each level-0 job, one batch delay per job:
    # the delay runs from the job's newest block, so it is at most its lags.
    lag = {k: metric_values(ember, f"ember_compaction_level0_lag_seconds_{k}")[""] for k in ["count", "sum"]}
    delay = {k: metric_values(ember, f"ember_compaction_level0_batch_delay_seconds_{k}")[""]
             for k in ["count", "sum"]}
    assert lag["count"] >= level0, lag
    assert 2 <= delay["count"] < lag["count"], (delay, lag)
    assert 0 < delay["sum"] <= lag["sum"], (delay, lag)
    # team-b's answers are unchanged. team-a pushed the same five profiles
    # plus a retry of p1's: before, the retry counted twice; now team-a's
    # answers are exactly team-b's.
    assert answers(ember, "team-b") == before["team-b"]
    assert answers(ember, "team-a") == before["team-b"]
    (total_retry, _, _), _, _, profiles_retry = before["team-a"]
    assert total_retry > before["team-b"][0][0]
    assert len(profiles_retry) > len(before["team-b"][3])
    # Compacted blocks answer the same after a restart (cold caches).
    warm = {t: answers(ember, t) for t in ["team-a", "team-b"]}
    ember.stop()
    ember = make_ember("--compaction-workers", "0", *FAST, data_dir=tmp_path, store=store)
    assert {t: answers(ember, t) for t in ["team-a", "team-b"]} == warm


def test_skip_level0_header_leaves_out_what_is_not_compacted_yet(make_ember, tmp_path):
    ember = make_ember(*FAST, data_dir=tmp_path)
    for i in range(3):
        push(ember, "t", f"p{i}")
    wait_compacted(ember)
    ember.stop()
    # A push after the compaction stays at level 0 (no workers now).
    ember = make_ember("--compaction-workers", "0", *FAST, data_dir=tmp_path)
    push(ember, "t", "p3")
    flame = f"SELECT * FROM flamegraph('{CPU}', '{{}}', 0, {FAR})"
    everything, _, _ = flame_stacks(ember.sql(flame, tenant="t"))
    compacted, _, _ = flame_stacks(ember.sql(flame, tenant="t", headers={"x-ember-skip-level0": "true"}))
    # Four identical pushes, three of them compacted.
    assert everything > 0 and compacted * 4 == everything * 3, (everything, compacted)
    explicit, _, _ = flame_stacks(ember.sql(flame, tenant="t", headers={"x-ember-skip-level0": "false"}))
    assert explicit == everything
    with pytest.raises(Exception, match="x-ember-skip-level0 must be true or false"):
        ember.sql(flame, tenant="t", headers={"x-ember-skip-level0": "sometimes"})


@pytest.mark.parametrize("step", ["compaction_after_read", "compaction_after_upload",
                                  "compaction_before_commit", "compaction_after_commit"])
def test_a_crash_at_each_compaction_step_loses_nothing_and_doubles_nothing(make_ember, tmp_path, step):
    ember = make_ember("--compaction-workers", "0", *FAST, data_dir=tmp_path)
    for i in range(4):
        push(ember, "t", f"pod{i}")
    want = {r["labels"]: r["v"] for r in ember.sql(
        "SELECT labels, sum(value) AS v FROM samples GROUP BY 1", tenant="t").to_pylist()}
    assert len(want) == 4
    ember.stop()

    crashing = Ember(tmp_path, [*FAST, "--compaction-crash-at", step])
    try:
        crashing.start()
    except AssertionError:
        pass  # the job ran and crashed before the server was ready
    deadline = time.time() + 60
    while crashing.alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not crashing.alive(), f"did not reach {step}"
    assert crashing.proc.returncode == -6  # SIGABRT: the crash point, nothing else
    crashing.stop()

    # The job runs again (once its lease expires) in a process without the fault.
    ember = make_ember(*FAST, data_dir=tmp_path)
    wait_compacted(ember, timeout=120)
    got = {r["labels"]: r["v"] for r in ember.sql(
        "SELECT labels, sum(value) AS v FROM samples GROUP BY 1", tenant="t").to_pylist()}
    assert got == want


def test_retention_drops_a_tenants_old_partitions_and_keeps_the_others(make_ember, tmp_path, store):
    limits = tmp_path / "limits.json"
    limits.write_text('{"tenants": {"keeper": {"compactor_blocks_retention_period_seconds": 0}}}')
    data = tmp_path / "data"
    data.mkdir()
    args = ["--retention-seconds", "86400", "--limits-file", str(limits), *FAST]
    # The fixture was recorded long ago: past a day's retention already.
    ember = make_ember("--compaction-workers", "0", *args, data_dir=data, store=store)
    for tenant in ["short", "keeper"]:
        push(ember, tenant, "p1")
    count = "SELECT count(*) AS n FROM profiles"
    assert ember.sql(count, tenant="short").to_pylist()[0]["n"] > 0
    kept = ember.sql(count, tenant="keeper").to_pylist()[0]["n"]
    ember.stop()
    # Retention runs when the planner starts, then once a minute.
    ember = make_ember("--compaction-workers", "0", *args, data_dir=data, store=store)
    deadline = time.time() + 30
    while ember.sql(count, tenant="short").to_pylist()[0]["n"] > 0:
        assert time.time() < deadline, "short's profiles outlived its retention"
        time.sleep(0.2)
    assert ember.sql(count, tenant="keeper").to_pylist()[0]["n"] == kept
    assert ember.sql("SELECT count(*) AS n FROM system.blocks", tenant="short").to_pylist()[0]["n"] == 0


TOKEN = "a-cluster-token-for-tests"


def metastore_process(make_ember, data_dir, *extra):
    """The metastore, ingest and query roles in one process, serving the
    metastore's commands on a port of their own; no compaction worker."""
    port = free_port()
    ember = make_ember("--roles", "distributor,segment-writer,metastore,query-frontend,query-backend",
                       "--metastore-listen-addr", f"127.0.0.1:{port}", "--cluster-token", TOKEN,
                       *FAST, *extra, data_dir=data_dir)
    return ember, f"http://127.0.0.1:{port}"


def worker_process(data_dir, metastore_url, *extra, token=TOKEN):
    return Ember(data_dir, ["--roles", "compaction-worker", "--metastore-peers", metastore_url,
                            "--cluster-token", token, *FAST, *extra])


def test_a_compaction_worker_in_its_own_process_compacts_through_the_metastore(make_ember, tmp_path):
    ember, url = metastore_process(make_ember, tmp_path)
    for i in range(5):
        for tenant in ["team-a", "team-b"]:
            push(ember, tenant, f"p{i}")
    before = {t: answers(ember, t) for t in ["team-a", "team-b"]}
    time.sleep(2)  # past the level-0 age: only a worker is missing
    assert set(metric_values(ember, "ember_blocks")) == {'{level="0"}'}

    # A worker with the wrong token is refused and changes nothing.
    intruder = worker_process(tmp_path, url, token="not-the-cluster-token").start()
    try:
        time.sleep(2)
        assert set(metric_values(ember, "ember_blocks")) == {'{level="0"}'}
        assert metric_values(intruder, "ember_compaction_jobs_committed_total")[""] == 0
    finally:
        intruder.stop()

    worker = worker_process(tmp_path, url).start()
    try:
        wait_compacted(ember)
        committed = metric_values(worker, "ember_compaction_jobs_committed_total")[""]
        assert committed >= 2
        # Worker memory: the pool's size now, and its peak during every job.
        assert metric_values(worker, "ember_compaction_job_peak_memory_bytes_count")[""] >= committed
        assert "" in metric_values(worker, "ember_compaction_memory_reserved_bytes")
        assert "ember_blocks" not in requests.get(f"{worker.http}/metrics", timeout=10).text
        assert {t: answers(ember, t) for t in ["team-a", "team-b"]} == {
            # The retry-free pushes: compaction changes no answer.
            t: before[t] for t in ["team-a", "team-b"]}
    finally:
        worker.stop()


def test_a_worker_process_killed_mid_job_loses_nothing(make_ember, tmp_path):
    ember, url = metastore_process(make_ember, tmp_path)
    for i in range(4):
        push(ember, "t", f"pod{i}")
    want = {r["labels"]: r["v"] for r in ember.sql(
        "SELECT labels, sum(value) AS v FROM samples GROUP BY 1", tenant="t").to_pylist()}
    crashing = worker_process(tmp_path, url, "--compaction-crash-at", "compaction_after_upload")
    try:
        crashing.start()
    except AssertionError:
        pass  # crashed before it answered /ready
    deadline = time.time() + 60
    while crashing.alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not crashing.alive() and crashing.proc.returncode == -6
    crashing.stop()
    # The lease runs out and another worker process takes the job again.
    worker = worker_process(tmp_path, url).start()
    try:
        wait_compacted(ember, timeout=120)
        got = {r["labels"]: r["v"] for r in ember.sql(
            "SELECT labels, sum(value) AS v FROM samples GROUP BY 1", tenant="t").to_pylist()}
        assert got == want
    finally:
        worker.stop()


def test_split_roles_are_refused_with_what_to_do(tmp_path):
    import subprocess
    from conftest import BIN
    cases = [
        (["--roles", "compaction-worker"], "--metastore-peers"),
        (["--roles", "distributor"], "--metastore-peers"),
        (["--roles", "distributor,metastore"], "--cluster-token"),
        (["--roles", "query-frontend,metastore"], "query-frontend and query-backend run together"),
        (["--roles", "compactor"], 'unknown role "compactor"'),
        (["--metastore-listen-addr", "127.0.0.1:0", "--cluster-token", "short"], "at least 16 characters"),
    ]
    for args, reason in cases:
        out = subprocess.run([str(BIN), "serve", "--data-dir", str(tmp_path), "--http-addr", "127.0.0.1:0",
                              "--flight-addr", "127.0.0.1:0", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, args
        assert reason in out.stderr, (args, out.stderr)


def test_an_index_rebuilt_from_the_objects_answers_as_the_lost_one_did(make_ember, tmp_path, store):
    ember = make_ember("--compaction-workers", "0", *FAST, data_dir=tmp_path, store=store)
    for i in range(5):
        for tenant in ["team-a", "team-b"]:
            push(ember, tenant, f"p{i}")
    ember.stop()
    # Compacted, with every replaced source still waiting for deletion.
    keep = ["--compaction-levels", "3:1,4:2", "--compaction-delete-delay-seconds", "3600"]
    ember = make_ember("--compaction-workers", "2", *keep, data_dir=tmp_path, store=store)
    deadline = time.time() + 90
    while not (set(metric_values(ember, "ember_blocks")) == {'{level="2"}'}
               and sum(metric_values(ember, "ember_compaction_jobs").values()) == 0):
        assert time.time() < deadline, metric_values(ember, "ember_blocks")
        time.sleep(0.25)
    # One more push that stays at level 0 beside the compacted blocks.
    push(ember, "team-b", "late")
    before = {t: answers(ember, t) for t in ["team-a", "team-b"]}
    ember.stop()
    assert [k for k in ember.store.keys("segments/") if k.endswith("block.bin")], "sources still stored"

    # The metastore's disk is lost; the objects remain.
    (tmp_path / "metastore.redb").unlink()
    rebuild = subprocess.run([str(BIN), "metastore", "rebuild", "--data-dir", str(tmp_path), *ember.store.args()],
                             capture_output=True, text=True, timeout=120)
    assert rebuild.returncode == 0, rebuild.stderr
    assert "indexed" in rebuild.stdout and "block footers" in rebuild.stderr, (rebuild.stdout, rebuild.stderr)
    ember = make_ember("--compaction-workers", "0", *keep, data_dir=tmp_path, store=store)
    assert {t: answers(ember, t) for t in ["team-a", "team-b"]} == before
    # A second rebuild over a metastore that exists is refused.
    again = subprocess.run([str(BIN), "metastore", "rebuild", "--data-dir", str(tmp_path), *ember.store.args()],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr, again.stderr
