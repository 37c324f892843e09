"""Three hosts, each a network namespace on one bridge, each running every
role with a replica of the metastore (Raft), over one shared object store.
Agents push to any host; a host dies (its process killed and its link
cut); the other two go on; nothing acknowledged is lost; the host comes
back and catches up."""

import contextlib
import ctypes
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import requests

from conftest import BIN, FIXTURES
from wire import fields, load_pprof, totals

CPU = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
RAW = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
TOKEN = "cluster-token-for-tests"
SUBNET = "10.213.7"
CLONE_NEWNET = 0x40000000


def profile_seconds(raw):
    import gzip
    body = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    return next(v for n, _, v in fields(body) if n == 9) // 10**9


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def netns(name):
    """Runs the block's new sockets in namespace `name` (this thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        assert libc.setns(target, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        yield
    finally:
        assert libc.setns(home, CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
        os.close(target)
        os.close(home)


class Network:
    """A switch namespace holding a bridge, and hosts joined to it by veth
    pairs; addresses exist only inside the namespaces."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"emb-{self.tag}-sw"
        self.namespaces = [self.switch]
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    def host(self, n):
        """Namespace `n` with address SUBNET.n; returns its name."""
        name = f"emb-{self.tag}-h{n}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        inside, outside = f"e{self.tag}{n}", f"s{self.tag}{n}"
        sh("ip", "-n", name, "link", "add", inside, "type", "veth", "peer", "name", outside,
           "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", outside, "master", "br0", "up")
        sh("ip", "-n", name, "addr", "add", f"{SUBNET}.{n}/24", "dev", inside)
        sh("ip", "-n", name, "link", "set", inside, "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def cut(self, n, up=False):
        """Takes host n's link to the switch down (or up again)."""
        sh("ip", "-n", self.switch, "link", "set", f"s{self.tag}{n}", "up" if up else "down")

    def close(self):
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Bucket:
    """A directory all hosts see, as a shared file system would be."""

    def __init__(self, root):
        self.root = root
        root.mkdir()

    def args(self):
        return ["--object-store-url", f"file://{self.root}"]

    def close(self):
        pass


class S3Bucket:
    """A bucket on an S3 server (moto's) running on a host of its own."""

    def __init__(self, net, log_dir):
        self.ns = net.host(200)
        self.endpoint = f"http://{SUBNET}.200:5000"
        self.log = open(log_dir / "moto.log", "wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, str(pathlib.Path(sys.executable).parent / "moto_server"),
             "-H", f"{SUBNET}.200", "-p", "5000"], stdout=self.log, stderr=subprocess.STDOUT)
        self.bucket = f"ember-{uuid.uuid4().hex[:12]}"

        def created():
            with contextlib.suppress(requests.ConnectionError), netns(self.ns):
                return requests.put(f"{self.endpoint}/{self.bucket}", timeout=2).status_code == 200
        wait_until("the S3 server", created, timeout=30)

    def args(self):
        options = {"aws_endpoint": self.endpoint, "aws_allow_http": "true", "aws_region": "us-east-1",
                   "aws_access_key_id": "test-key", "aws_secret_access_key": "test-secret"}
        out = ["--object-store-url", f"s3://{self.bucket}/cluster"]
        for k, v in options.items():
            out += ["--object-store-option", f"{k}={v}"]
        return out

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


class Host:
    """`ember serve` with every role and a metastore replica, in a namespace."""

    def __init__(self, net, n, replicas, data_dir, bucket):
        self.net, self.n, self.data_dir, self.bucket = net, n, data_dir, bucket
        self.ns = net.host(n)
        self.addr = f"{SUBNET}.{n}"
        self.http = f"http://{self.addr}:4040"
        self.peers = ",".join(f"{i}=http://{SUBNET}.{i}:4041" for i in range(1, replicas + 1))
        self.proc = None

    def start(self):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "ember.log", "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, str(BIN), "serve", "--data-dir", str(self.data_dir),
             *self.bucket.args(),
             "--http-addr", f"{self.addr}:4040", "--flight-addr", f"{self.addr}:50051",
             "--metastore-listen-addr", f"{self.addr}:4041", "--cluster-token", TOKEN,
             "--node-id", str(self.n), "--metastore-peers", self.peers,
             "--reject-older-than-seconds", "0", "--compaction-workers", "0"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, f"host {self.n}: ember exited at start"
            with contextlib.suppress(requests.ConnectionError), netns(self.ns):
                if requests.get(f"{self.http}/ready", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"host {self.n}: ember did not become ready")

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def metric(self, name):
        with netns(self.ns):
            text = requests.get(f"{self.http}/metrics", timeout=5).text
        m = re.search(rf"^{name} (\d+)", text, re.M)
        return int(m.group(1)) if m else None

    def push(self, pod):
        with netns(self.ns):
            return push_pod(self.http, pod)

    def total(self):
        """The flame graph's total for the service, through the render API."""
        return self.flame()["numTicks"]

    def flame(self):
        with netns(self.ns):
            return render(self.http)


def push_pod(http, pod):
    """Pushes the recorded profile as pod `pod` of the service; whether it
    was acknowledged."""
    from wire import push_request
    import gzip
    labels = {"__name__": "process_cpu", "service_name": "cluster-api", "pod": pod}
    body = gzip.compress(push_request([(labels, [RAW])]))
    try:
        r = requests.post(f"{http}/push.v1.PusherService/Push", data=body, timeout=30,
                          headers={"Content-Type": "application/proto", "Content-Encoding": "gzip",
                                   "X-Scope-OrgID": "t"})
    except requests.RequestException:
        return False
    return r.status_code == 200


def render(http):
    """The service's flame graph (flamebearer) through the render API, whole."""
    at = profile_seconds(RAW)
    r = requests.get(f"{http}/pyroscope/render", timeout=30, headers={"X-Scope-OrgID": "t"},
                     params={"query": f'{CPU}{{service_name="cluster-api"}}', "from": str(at - 60),
                             "until": str(at + 60), "format": "json", "max-nodes": "100000"})
    assert r.status_code == 200, r.text
    return r.json()["flamebearer"]


def flame_stacks(fb):
    """'a;b' -> self, from a flamebearer's levels (offset, total, self, name
    per bar, offsets delta encoded within a level)."""
    bars, out = [], {}
    for depth, values in enumerate(fb["levels"]):
        end, row = 0, []
        for i in range(0, len(values), 4):
            off, total, own, name = values[i:i + 4]
            x = end + off
            end = x + total
            path = [] if depth == 0 else next(
                b for b in bars[depth - 1] if b[0] <= x < b[0] + max(b[1], 1))[3] + [fb["names"][name]]
            row.append((x, total, own, path))
            if depth and own:
                out[";".join(path)] = out.get(";".join(path), 0) + own
        bars.append(row)
    return out


def wait_until(what, check, timeout=60):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(params=["shared-fs", "s3"])
def cluster(request, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the cluster test makes network namespaces: run it as root")
    net = Network()
    hosts, bucket = [], None
    try:
        bucket = Bucket(tmp_path / "bucket") if request.param == "shared-fs" else S3Bucket(net, tmp_path)
        hosts = [Host(net, n, 3, tmp_path / f"host{n}", bucket) for n in (1, 2, 3)]
        for h in hosts:
            h.start()
        yield net, hosts
    finally:
        for h in hosts:
            h.stop()
        if bucket:
            bucket.close()
        net.close()


def leader_of(hosts):
    def found():
        leaders = [h for h in hosts if h.proc.poll() is None and h.metric("ember_metastore_raft_leader") == 1]
        return leaders[0] if len(leaders) == 1 else None
    return wait_until("one leader", found)


def test_a_host_dies_and_nothing_acknowledged_is_lost(cluster):
    net, hosts = cluster
    per_profile = totals(load_pprof(RAW), "process_cpu")[CPU]
    leader = leader_of(hosts)
    # The operator's view of the replicas, from any host.
    listed = subprocess.run(["ip", "netns", "exec", hosts[2].ns, str(BIN), "metastore", "members",
                             "--metastore-url", f"http://{hosts[2].addr}:4041", "--cluster-token", TOKEN],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert sorted(int(r[0]) for r in rows) == [1, 2, 3]
    assert [int(r[0]) for r in rows if r[2] == "leader"] == [leader.n]

    acknowledged = 0
    for i in range(12):
        assert hosts[i % 3].push(f"pod-{i}"), f"push {i} to host {hosts[i % 3].n}"
        acknowledged += 1
    # Reads are linearizable: any host answers with every profile
    # acknowledged before the query, without waiting.
    for h in hosts:
        assert h.total() == acknowledged * per_profile, f"host {h.n}"

    # The leader's host dies: process killed, link cut.
    leader.kill()
    net.cut(leader.n)
    survivors = [h for h in hosts if h is not leader]
    new_leader = leader_of(survivors)
    assert new_leader is not leader
    for i in range(12, 24):
        h = survivors[i % 2]
        if h.push(f"pod-{i}"):
            acknowledged += 1
    assert acknowledged >= 20, f"only {acknowledged} of 24 pushes acknowledged with two hosts of three up"
    for h in survivors:
        wait_until(f"host {h.n} to see every acknowledged profile",
                   lambda: h.total() == acknowledged * per_profile)

    # Back from its disk, the host catches up on what it missed.
    net.cut(leader.n, up=True)
    leader.start()
    wait_until(f"host {leader.n} to catch up", lambda: leader.total() == acknowledged * per_profile)
    assert leader.metric("ember_metastore_raft_applied_index") >= new_leader.metric(
        "ember_metastore_raft_applied_index") - 5


def test_a_leader_cut_off_loses_nothing_it_acknowledged_and_rejoins(cluster):
    net, hosts = cluster
    per_profile = totals(load_pprof(RAW), "process_cpu")[CPU]
    leader = leader_of(hosts)
    others = [h for h in hosts if h is not leader]
    assert others[0].push("before")
    acknowledged = 1

    # Cut off, the old leader cannot commit. A push to it is refused, or,
    # when its block reached the bucket, acknowledged with the block's
    # registration left in dlq/ for whichever host gets to it first.
    net.cut(leader.n)
    new_leader = leader_of(others)
    acknowledged += sum(leader.push(f"cut-off-{i}") for i in range(2))
    assert others[1].push("during")
    acknowledged += 1

    # Healed, it follows the new leader; every host serves every
    # acknowledged profile.
    net.cut(leader.n, up=True)
    wait_until(f"host {leader.n} to follow", lambda: leader.metric("ember_metastore_raft_leader") == 0)
    assert new_leader.metric("ember_metastore_raft_leader") == 1
    for h in hosts:
        wait_until(f"host {h.n} to serve all {acknowledged} acknowledged profiles",
                   lambda: h.total() == acknowledged * per_profile)


class RoleProcess:
    """`ember serve --roles ROLES` on a host: one process per role (pair)."""

    def __init__(self, host_ns, addr, name, roles, http_port, data_dir, args):
        self.ns, self.addr, self.name = host_ns, addr, name
        self.http = f"http://{addr}:{http_port}"
        self.data_dir = data_dir
        self.argv = [str(BIN), "serve", "--roles", roles, "--data-dir", str(data_dir),
                     "--http-addr", f"{addr}:{http_port}", *args]
        self.proc = None

    def start(self):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "ember.log", "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.argv],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def ready(self):
        assert self.proc.poll() is None, f"{self.name} exited: see {self.data_dir / 'ember.log'}"
        with contextlib.suppress(requests.ConnectionError), netns(self.ns):
            return requests.get(f"{self.http}/ready", timeout=1).status_code == 200

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    metric = Host.metric
    push = Host.push
    total = Host.total
    flame = Host.flame


@pytest.fixture
def split_cluster(tmp_path):
    """Three hosts, each running every role in processes of their own: a
    metastore replica, a distributor, a segment writer, a query process
    (frontend and backend) and a compaction worker; the bucket on S3 (moto)
    on a fourth host."""
    if os.geteuid() != 0:
        pytest.fail("the cluster test makes network namespaces: run it as root")
    net = Network()
    procs, bucket = {}, None
    try:
        bucket = S3Bucket(net, tmp_path)
        peers = ",".join(f"{i}=http://{SUBNET}.{i}:4041" for i in (1, 2, 3))
        common = [*bucket.args(), "--cluster-token", TOKEN, "--metastore-peers", peers]
        for n in (1, 2, 3):
            ns, addr, base = net.host(n), f"{SUBNET}.{n}", tmp_path / f"host{n}"
            procs[("metastore", n)] = RoleProcess(
                ns, addr, f"metastore {n}", "metastore", 4050, base / "metastore",
                [*common, "--node-id", str(n), "--metastore-listen-addr", f"{addr}:4041",
                 "--compaction-levels", "3:1,4:2", "--compaction-delete-delay-seconds", "1"])
            procs[("ingest", n)] = RoleProcess(
                ns, addr, f"distributor {n}", "distributor", 4040, base / "distributor",
                [*common, "--reject-older-than-seconds", "0"])
            procs[("segment-writer", n)] = RoleProcess(
                ns, addr, f"segment writer {n}", "segment-writer", 4080, base / "segment-writer",
                [*common, "--advertise-addr", f"{addr}:4080"])
            procs[("query", n)] = RoleProcess(
                ns, addr, f"query {n}", "query-frontend,query-backend", 4060, base / "query",
                [*common, "--flight-addr", f"{addr}:50051"])
            procs[("compaction", n)] = RoleProcess(
                ns, addr, f"compaction {n}", "compaction-worker", 4070, base / "compaction",
                [*common, "--compaction-workers", "1"])
        for p in procs.values():
            p.start()
        for p in procs.values():
            wait_until(f"{p.name} to be ready", p.ready)
        yield net, procs
    finally:
        for p in procs.values():
            p.stop()
        if bucket:
            bucket.close()
        net.close()


def test_every_role_in_its_own_process_survives_the_death_of_any_one(split_cluster, make_ember, tmp_path):
    net, procs = split_cluster
    per_profile = totals(load_pprof(RAW), "process_cpu")[CPU]
    metastores = [procs[("metastore", n)] for n in (1, 2, 3)]
    ingest = [procs[("ingest", n)] for n in (1, 2, 3)]
    queries = [procs[("query", n)] for n in (1, 2, 3)]

    # Every process registered with the metastore; each distributor counts
    # the others (it takes its share of each tenant's ingestion rate).
    def distributors_seen():
        with netns(ingest[0].ns):
            text = requests.get(f"{ingest[0].http}/metrics", timeout=5).text
        m = re.search(r'^ember_cluster_instances\{role="distributor"\} (\d+)', text, re.M)
        return m is not None and int(m.group(1)) == 3
    wait_until("the distributors to see each other", distributors_seen, timeout=30)

    acknowledged = 0
    for i in range(9):
        assert ingest[i % 3].push(f"pod-{i}"), f"push {i} to {ingest[i % 3].name}"
        acknowledged += 1
    # Query processes read the index from the metastore's replicas:
    # linearizable, so every acknowledged profile is there at once.
    for q in queries:
        assert q.total() == acknowledged * per_profile, q.name

    # A replica stalls as on a disk that stops answering (the process
    # frozen, its sockets open): the others go on without it, and it
    # catches up once it runs again.
    stalled = next(m for m in metastores if m is not leader_of(metastores))
    os.kill(stalled.proc.pid, signal.SIGSTOP)
    try:
        for i in range(100, 103):
            assert ingest[i % 3].push(f"pod-{i}"), f"push {i} with a replica stalled"
            acknowledged += 1
        for q in queries:
            wait_until(f"{q.name} to answer with a replica stalled",
                       lambda: q.total() == acknowledged * per_profile)
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)

    # The metastore's leader dies; the others elect one; ingest and queries
    # go on through the survivors without being told.
    leader = leader_of(metastores)
    killed_at = time.time()
    leader.kill()
    survivors = [m for m in metastores if m is not leader]
    leader_of(survivors)
    failover = time.time() - killed_at
    print(f"metastore failover: a new leader in {failover:.2f} s")
    assert failover < 15
    for i in range(9, 18):
        assert ingest[i % 3].push(f"pod-{i}"), f"push {i} to {ingest[i % 3].name}"
        acknowledged += 1
    for q in queries:
        wait_until(f"{q.name} to see {acknowledged} profiles",
                   lambda: q.total() == acknowledged * per_profile)

    # A segment writer dies: its shards move to the others, and no push to
    # any distributor fails.
    writer = procs[("segment-writer", 2)]
    writer.kill()
    for i in range(18, 24):
        assert ingest[i % 3].push(f"pod-{i}"), f"push {i} with a segment writer dead"
        acknowledged += 1
    # A distributor dies; agents push to the others.
    ingest[1].kill()
    assert ingest[0].push("pod-24") and ingest[2].push("pod-25")
    acknowledged += 2

    # A query process restarts: it kept nothing that mattered.
    queries[2].kill()
    queries[2].start()
    wait_until(f"{queries[2].name} to be ready", queries[2].ready)

    # One host's link is cut and restored: its processes carry on after.
    net.cut(3)
    assert ingest[0].push("during-cut")
    acknowledged += 1
    net.cut(3, up=True)

    # The dead come back; compaction runs in its own processes; nothing
    # acknowledged is lost and nothing is counted twice.
    leader.start()
    ingest[1].start()
    writer.start()
    for p in (leader, ingest[1], writer):
        wait_until(f"{p.name} to be ready", p.ready)

    def compacted():
        current = leader_of(metastores)
        with netns(current.ns):
            text = requests.get(f"{current.http}/metrics", timeout=5).text
        level0 = re.search(r'^ember_blocks\{level="0"\} (\d+)', text, re.M)
        higher = re.search(r'^ember_blocks\{level="[12]"\} (\d+)', text, re.M)
        return higher is not None and (level0 is None or level0.group(1) == "0")
    wait_until("level-0 blocks to be compacted", compacted, timeout=120)
    for q in queries:
        wait_until(f"{q.name} to answer every acknowledged profile once",
                   lambda: q.total() == acknowledged * per_profile)

    # Each query process's flame graph is the one a single process gives
    # for the same pushes (the acknowledged ones; none was refused here).
    pods = [f"pod-{i}" for i in [*range(9), *range(100, 103), *range(9, 24)]] + ["pod-24", "pod-25", "during-cut"]
    assert len(pods) == acknowledged
    (tmp_path / "single").mkdir()
    single = make_ember("--compaction-workers", "0", data_dir=tmp_path / "single")
    for pod in pods:
        assert push_pod(single.http, pod)
    want = flame_stacks(render(single.http))
    assert sum(want.values()) == acknowledged * per_profile
    for q in queries:
        assert flame_stacks(q.flame()) == want, q.name
