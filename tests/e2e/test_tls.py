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
