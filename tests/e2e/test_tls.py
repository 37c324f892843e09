"""TLS from a certificate in configuration, for HTTP and Flight SQL, with
real clients that verify it against the (self-signed) certificate."""

import gzip
import subprocess

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as pf
import pytest
import requests

from conftest import FIXTURES
from wire import flight_sql_command, push_request


@pytest.fixture
def cert(tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(crt),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return crt, key


def test_http_and_flight_sql_over_tls_with_a_configured_certificate(make_ember, cert):
    crt, key = cert
    ember = make_ember("--tls-cert", str(crt), "--tls-key", str(key))
    assert ember.http.startswith("https://")
    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    body = gzip.compress(push_request([({"__name__": "process_cpu", "service_name": "tls"}, [raw])]))
    headers = {"Content-Type": "application/proto", "Content-Encoding": "gzip"}
    r = requests.post(f"{ember.http}/push.v1.PusherService/Push", data=body, headers=headers, verify=str(crt), timeout=30)
    assert r.status_code == 200, r.text
    # Plain HTTP on the TLS port gets no answer; an unverified client is refused.
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{ember.http_port}/ready", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{ember.http}/ready", timeout=5)
    pem = crt.read_bytes()
    db_kwargs = {"adbc.flight.sql.client_option.tls_root_certs": pem.decode()}
    with flightsql.connect(ember.flight, autocommit=True, db_kwargs=db_kwargs) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT service_name, sum(value) AS v FROM samples GROUP BY 1")
            rows = cur.fetch_arrow_table().to_pylist()
    assert [r["service_name"] for r in rows] == ["tls"] and rows[0]["v"] > 0
    client = pf.FlightClient(ember.flight, tls_root_certs=pem)
    info = client.get_flight_info(pf.FlightDescriptor.for_command(flight_sql_command("SELECT 1 AS one")))
    assert client.do_get(info.endpoints[0].ticket).read_all().column("one")[0].as_py() == 1
    plain = pf.FlightClient(f"grpc://127.0.0.1:{ember.flight_port}")
    with pytest.raises(pf.FlightError):
        plain.get_flight_info(pf.FlightDescriptor.for_command(flight_sql_command("SELECT 1")), pf.FlightCallOptions(timeout=5))
    assert ember.alive()


def cluster_ca(tmp_path, name):
    """A CA and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ca_key, ca = tmp_path / f"{name}-ca-key.pem", tmp_path / f"{name}-ca.pem"
    key, csr, crt = tmp_path / f"{name}-key.pem", tmp_path / f"{name}.csr", tmp_path / f"{name}-cert.pem"
    ext = tmp_path / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", f"/CN={name} cluster CA", "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(crt))
    return ca, crt, key


def test_a_cluster_s_internal_calls_go_over_tls_and_trust_only_the_cluster_s_certificate(make_ember, tmp_path):
    """Three metastore replicas (Raft over https), each with a segment writer
    and a compaction worker; a distributor alone (appends to the segment
    writers and registrations over https) and a query process alone (index
    reads over https). Every process presents a certificate the cluster's CA
    signed, and trusts that CA only."""
    from conftest import free_port
    from wire import load_pprof, totals
    import time

    ca, crt, key = cluster_ca(tmp_path, "ours")
    token = "cluster-token-for-tls-tests"
    ports = [free_port() for _ in range(3)]
    peers = ",".join(f"{i + 1}=https://127.0.0.1:{p}" for i, p in enumerate(ports))
    common = ["--tls-cert", str(crt), "--tls-key", str(key), "--cluster-token", token, "--metastore-peers", peers,
              "--object-store-url", f"file://{tmp_path / 'bucket'}"]

    def process(name, *args, trusted=ca):
        d = tmp_path / name
        d.mkdir()
        return make_ember(*common, "--cluster-ca", str(trusted), *args, data_dir=d)
    for i, port in enumerate(ports):
        process(f"replica{i + 1}", "--roles", "metastore,segment-writer,compaction-worker", "--node-id", str(i + 1),
                "--metastore-listen-addr", f"127.0.0.1:{port}", "--compaction-workers", "1")
    distributor = process("distributor", "--roles", "distributor")
    query = process("query", "--roles", "query-frontend,query-backend")

    # The metastore listener speaks TLS only, with the cluster's certificate.
    with pytest.raises(requests.RequestException):
        requests.post(f"http://127.0.0.1:{ports[0]}/ember.metastore.v1.MetastoreService/Instances", timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(f"https://127.0.0.1:{ports[0]}/ember.metastore.v1.MetastoreService/Instances", timeout=5)
    r = requests.post(f"https://127.0.0.1:{ports[0]}/ember.metastore.v1.MetastoreService/Instances",
                      verify=str(ca), timeout=5)
    assert r.status_code == 401, r.text

    raw = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()
    cpu = "process_cpu:cpu:nanoseconds:cpu:nanoseconds"
    per_profile = totals(load_pprof(raw), "process_cpu")[cpu]
    headers = {"Content-Type": "application/proto", "Content-Encoding": "gzip"}
    pushed = 0
    for pod in range(6):
        labels = {"__name__": "process_cpu", "service_name": "tls-cluster", "pod": f"p{pod}"}
        body = gzip.compress(push_request([(labels, [raw])]))
        r = requests.post(f"{distributor.http}/push.v1.PusherService/Push", data=body, headers=headers,
                          verify=str(ca), timeout=30)
        assert r.status_code == 200, r.text
        pushed += 1

    from test_cluster import profile_seconds
    at = profile_seconds(raw)

    def total():
        r = requests.get(f"{query.http}/pyroscope/render", verify=str(ca), timeout=30,
                         params={"query": f'{cpu}{{service_name="tls-cluster"}}', "from": str(at - 60),
                                 "until": str(at + 60), "format": "json"})
        assert r.status_code == 200, r.text
        return r.json()["flamebearer"]["numTicks"]
    deadline = time.time() + 30
    while total() != pushed * per_profile and time.time() < deadline:
        time.sleep(0.2)
    assert total() == pushed * per_profile

    # A process that trusts another certificate reaches no replica: its
    # queries fail with the reason, and it never reads the index in clear.
    other, _, _ = cluster_ca(tmp_path, "theirs")
    stranger = process("stranger", "--roles", "query-frontend,query-backend", trusted=other)
    r = requests.get(f"{stranger.http}/pyroscope/render", verify=str(ca), timeout=60,
                     params={"query": f'{cpu}{{service_name="tls-cluster"}}', "from": str(at - 60),
                             "until": str(at + 60), "format": "json"})
    assert r.status_code == 503, r.text
    assert "certificate" in r.text.lower(), r.text
