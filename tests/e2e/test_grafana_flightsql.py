"""Flight SQL as Grafana's Flight SQL data source (influxdata's plugin, on
the Go Flight SQL client) calls it, written here as raw Flight SQL commands
so that every positional detail the plugin relies on is checked: GetSqlInfo
read by row, GetTables filtered by its table types and with the serialized
schema, `select 1` with exactly one endpoint; then what BI tools add on top:
table types and prepared statements with bound parameters (ADBC, the same
Go client library)."""

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.flight as pf

from conftest import FIXTURES
from wire import _bytes_field, _key, _varint, fields, flight_sql_command

RAW = (FIXTURES / "pprof" / "go-cpu.pb.gz").read_bytes()


def command(name, body=b""):
    url = f"type.googleapis.com/arrow.flight.protocol.sql.{name}".encode()
    return _bytes_field(1, url) + _bytes_field(2, body)


def fetch(ember, cmd, tenant="t"):
    client = pf.FlightClient(ember.flight)
    options = pf.FlightCallOptions(headers=[(b"x-scope-orgid", tenant.encode())])
    info = client.get_flight_info(pf.FlightDescriptor.for_command(cmd), options)
    assert len(info.endpoints) == 1  # the plugin refuses any other count
    return client.do_get(info.endpoints[0].ticket, options).read_all()


def test_sql_info_rows_17_to_21_are_the_editor_lists(ember):
    info = fetch(ember, command("CommandGetSqlInfo"))  # no ids: everything
    names = info.column("info_name").to_pylist()
    values = info.column("value").to_pylist()
    # What the plugin's query editor reads by position.
    assert names[17:22] == [508, 509, 510, 511, 512]
    keywords, numeric, string, system, datetime = values[17:22]
    for listed in (keywords, numeric, string, system, datetime):
        assert isinstance(listed, list) and all(isinstance(x, str) for x in listed)
    assert "SELECT" in keywords
    assert {"abs", "round"} <= set(numeric)
    assert {"upper", "concat"} <= set(string)
    assert {"flamegraph", "series", "pprof"} <= set(system)
    assert {"date_bin", "now", "date_part"} <= set(datetime)
    assert values[names.index(0)] == "Ember"


def test_tables_filtered_as_the_plugin_asks_with_their_schema(ember):
    assert ember.push_proto([({"__name__": "process_cpu", "service_name": "api"}, [RAW])],
                            tenant="t").status_code == 200
    types = _bytes_field(4, b"BASE TABLE") + _bytes_field(4, b"table")
    tables = fetch(ember, command("CommandGetTables", types))
    rows = list(zip(tables.column("db_schema_name").to_pylist(), tables.column("table_name").to_pylist()))
    assert sorted(rows) == [("t", "profiles"), ("t", "samples"), ("t", "stacks")]
    # The columns call: a name pattern, include_schema, no type filter.
    one = fetch(ember, command("CommandGetTables", _bytes_field(3, b"samples") + _key(5, 0) + _varint(1)))
    assert one.column("table_name").to_pylist() == ["samples"]
    schema = pa.ipc.read_schema(pa.py_buffer(one.column("table_schema")[0].as_py()))
    assert {"time", "service_name", "profile_type", "labels", "stack_id", "value"} <= set(schema.names)
    # Every type a client may filter on.
    kinds = fetch(ember, command("CommandGetTableTypes")).column("table_type").to_pylist()
    assert sorted(kinds) == ["BASE TABLE", "SYSTEM TABLE"]
    system = fetch(ember, command("CommandGetTables", _bytes_field(4, b"SYSTEM TABLE")))
    assert sorted(system.column("table_name").to_pylist()) == ["blocks", "compaction_jobs"]


def test_health_check_select_1(ember):
    assert fetch(ember, flight_sql_command("select 1")).num_rows == 1


def test_prepared_statements_take_bound_parameters(ember):
    for service in ["api", "web"]:
        assert ember.push_proto([({"__name__": "process_cpu", "service_name": service}, [RAW])],
                                tenant="t").status_code == 200
    sql = "SELECT count(*) AS n, sum(value) AS v FROM samples WHERE service_name = $1 AND profile_type LIKE $2"
    kwargs = {"db_kwargs": {"adbc.flight.sql.rpc.call_header.x-scope-orgid": "t"}}
    with flightsql.connect(ember.flight, autocommit=True, **kwargs) as conn:
        with conn.cursor() as cur:
            params = cur.adbc_prepare(sql)
            assert params.names == ["$1", "$2"]
            for service in ["api", "web", "none"]:
                cur.execute(sql, parameters=(service, "process_cpu:cpu%"))
                got = cur.fetch_arrow_table().to_pylist()
                cur.execute(f"SELECT count(*) AS n, sum(value) AS v FROM samples "
                            f"WHERE service_name = '{service}' AND profile_type LIKE 'process_cpu:cpu%'")
                want = cur.fetch_arrow_table().to_pylist()
                assert got == want
                assert (got[0]["n"] > 0) == (service != "none")


def test_xdbc_type_info_lists_types_that_sql_takes(ember):
    table = fetch(ember, command("CommandGetXdbcTypeInfo"))
    names = table.column("type_name").to_pylist()
    assert {"BOOLEAN", "BIGINT", "DOUBLE", "VARCHAR", "TIMESTAMP", "DATE"} <= set(names)
    # Filtered by data type (BIGINT is -5 in the XDBC numbering).
    only = fetch(ember, command("CommandGetXdbcTypeInfo", _key(1, 0) + _varint(-5 & (2**64 - 1))))
    assert only.column("type_name").to_pylist() == ["BIGINT"]
    # Every listed type is one the SQL dialect casts to.
    for name in names:
        if name != "INTERVAL":
            assert ember.sql(f"SELECT CAST(NULL AS {name}) AS x", tenant="t").num_rows == 1, name


def cancel(client, info, options):
    """CancelFlightInfo with the FlightInfo: the CancelStatus number."""
    body = _bytes_field(1, info.serialize())
    [result] = list(client.do_action(pf.Action("CancelFlightInfo", body), options))
    return dict((n, v) for n, _, v in fields(result.body.to_pybytes())).get(1, 0)


def test_cancel_flight_info_stops_a_query_and_refuses_its_ticket(ember):
    import time
    client = pf.FlightClient(ember.flight)
    options = pf.FlightCallOptions(headers=[(b"x-scope-orgid", b"t")])
    other = pf.FlightCallOptions(headers=[(b"x-scope-orgid", b"u")])

    def info_of(sql):
        return client.get_flight_info(pf.FlightDescriptor.for_command(flight_sql_command(sql)), options)

    # Cancelled before it is fetched: its ticket is refused; another
    # FlightInfo of the same SQL is a query of its own, and answers.
    info = info_of("SELECT 1 AS x")
    assert cancel(client, info, options) == 1  # CANCEL_STATUS_CANCELLED
    try:
        client.do_get(info.endpoints[0].ticket, options).read_all()
        raise AssertionError("a cancelled ticket was served")
    except pf.FlightCancelledError:
        pass
    assert client.do_get(info_of("SELECT 1 AS x").endpoints[0].ticket, options).read_all().num_rows == 1

    # Cancelled while it streams: the stream ends with CANCELLED. Another
    # tenant's cancel of the same FlightInfo changes nothing.
    info = info_of("SELECT * FROM generate_series(1, 100000000000)")
    reader = client.do_get(info.endpoints[0].ticket, options)
    reader.read_chunk()
    cancel(client, info, other)
    for _ in range(20):
        reader.read_chunk()
    assert cancel(client, info, options) == 1
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            reader.read_chunk()
        raise AssertionError("the cancelled query kept streaming")
    except pf.FlightCancelledError:
        pass
    # The server goes on answering.
    assert ember.sql("SELECT 2 AS y", tenant="t").column("y").to_pylist() == [2]
