"""The flame-graph aggregation Ember answers, run in DuckDB and chDB over Parquet.

    .venv/bin/python benches/e2e/peers.py --spec queries.json [--engines duckdb,chdb]

The spec names the queries to run and, for each, the Parquet files (a path
or a glob: `ember bench` writes a file per service, so that a one-service
query reads one file) to run it over:

    {"repeats": 5,
     "queries": [{"name": "...", "profile_type": "...", "service_name": "svc-3" or null,
                  "start_ns": ..., "end_ns": ...,
                  "denormalised": "/abs/denormalised/svc-3.parquet",  # time, service_name, profile_type, labels, stack list<string>, value
                  "normalised": "/abs/normalised/svc-3.parquet",      # time, service_name, profile_type, labels, stack_id, value
                  "stacks": "/abs/stacks.parquet"}]}                 # stack_id, frames list<string> (root first)

For each engine, shape (denormalised: GROUP BY the stack list; normalised:
GROUP BY stack_id, then join stacks.parquet for the frames) and query, two
kinds are timed, each once cold-ish (first_ms) and then `repeats` times
(median_ms, min_ms):

    group_by  sum(value) per stack, fetched whole into Python as an Arrow table;
    tree      the same plus the frames, folded in Python into a nested tree of
              name -> (total, children); `nodes` counts its nodes, the root not
              included (one per distinct call-path prefix).

The time range is inclusive at both ends, compared at nanosecond precision as
UTC instants (DuckDB reads the column as TIMESTAMPTZ_NS, chDB as
DateTime64(9, 'UTC')). The files are queried where they lie, never loaded into
tables. Prints {"peers": [...]} as JSON on stdout, progress on stderr; exits 2
when an engine cannot be imported.
"""

import argparse
import gc
import json
import statistics
import sys
import time

import pyarrow.compute as pc

ENGINES = ("duckdb", "chdb")
SHAPES = ("denormalised", "normalised")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sql_string(text, escape_backslash):
    """A single-quoted SQL literal, for the file paths; ClickHouse reads
    backslash escapes in literals, DuckDB does not."""
    if escape_backslash:
        text = text.replace("\\", "\\\\")
    return "'" + text.replace("'", "''") + "'"


class DuckDB:
    name = "duckdb"

    def __init__(self):
        import duckdb

        self.version = duckdb.__version__
        self.conn = duckdb.connect()  # in memory, default threads: all cores

    @staticmethod
    def file(query, key):
        return f"read_parquet({sql_string(query[key], False)})"

    def where(self, query):
        """The filter and its parameters. make_timestamp_ns gives a TIMESTAMP_NS;
        AT TIME ZONE 'UTC' makes it the TIMESTAMPTZ_NS instant whatever the
        session's TimeZone (a plain cast would read it in local time)."""
        clauses = ["profile_type = $profile_type",
                   "time BETWEEN (make_timestamp_ns($start_ns) AT TIME ZONE 'UTC')"
                   " AND (make_timestamp_ns($end_ns) AT TIME ZONE 'UTC')"]
        params = {"profile_type": query["profile_type"],
                  "start_ns": query["start_ns"], "end_ns": query["end_ns"]}
        if query["service_name"] is not None:
            clauses.append("service_name = $service_name")
            params["service_name"] = query["service_name"]
        return " AND ".join(clauses), params

    def arrow_table(self, sql, params):
        return self.conn.sql(sql, params=params).to_arrow_table()

    @staticmethod
    def total(column):
        return f"CAST(sum({column}) AS BIGINT)"  # sum of BIGINT is a HUGEINT otherwise


class ChDB:
    name = "chdb"

    def __init__(self):
        import chdb

        self.conn = chdb.connect(":memory:")
        engine = self.conn.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
        self.version = f"{chdb.__version__} (ClickHouse {engine})"

    @staticmethod
    def file(query, key):
        return f"file({sql_string(query[key], True)}, Parquet)"

    def where(self, query):
        """The filter and its parameters; fromUnixTimestamp64Nano with 'UTC'
        is a DateTime64(9, 'UTC'), the type chDB reads timestamp[ns, tz=UTC] as."""
        clauses = ["profile_type = {profile_type:String}",
                   "time BETWEEN fromUnixTimestamp64Nano({start_ns:Int64}, 'UTC')"
                   " AND fromUnixTimestamp64Nano({end_ns:Int64}, 'UTC')"]
        params = {"profile_type": query["profile_type"],
                  "start_ns": query["start_ns"], "end_ns": query["end_ns"]}
        if query["service_name"] is not None:
            clauses.append("service_name = {service_name:String}")
            params["service_name"] = query["service_name"]
        return " AND ".join(clauses), params

    def arrow_table(self, sql, params):
        return self.conn.query(sql, "ArrowTable", params=params)

    @staticmethod
    def total(column):
        return f"sum({column})"


def group_by_sql(engine, shape, query, where):
    if shape == "denormalised":
        return (f"SELECT stack, {engine.total('value')} AS value FROM {engine.file(query, 'denormalised')}"
                f" WHERE {where} GROUP BY stack")
    return (f"SELECT stack_id, {engine.total('value')} AS value FROM {engine.file(query, 'normalised')}"
            f" WHERE {where} GROUP BY stack_id")


def tree_sql(engine, shape, query, where):
    """Frames and value per stack: the group_by itself when denormalised, else
    the aggregate joined to the stacks file."""
    if shape == "denormalised":
        return group_by_sql(engine, shape, query, where)
    return (f"SELECT s.frames AS stack, a.value AS value"
            f" FROM ({group_by_sql(engine, shape, query, where)}) AS a"
            f" INNER JOIN {engine.file(query, 'stacks')} AS s ON s.stack_id = a.stack_id")


def flame_tree(table):
    """Folds (stack, value) rows into {name: [total, children]} and returns
    (tree, node count)."""
    tree = {}
    nodes = 0
    for frames, value in zip(table.column("stack").to_pylist(), table.column("value").to_pylist()):
        children = tree
        for name in frames:
            node = children.get(name)
            if node is None:
                node = children[name] = [0, {}]
                nodes += 1
            node[0] += value
            children = node[1]
    return tree, nodes


def timed_ms(run):
    """One call's result and milliseconds, with the garbage collector off (as
    timeit does) and the result freed only after the clock stops."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        result = run()
        return result, (time.perf_counter() - started) * 1e3
    finally:
        gc.enable()


def timings(run, repeats):
    """Runs `run` once, then `repeats` times; its first result and the times."""
    result, first_ms = timed_ms(run)
    times = [timed_ms(run)[1] for _ in range(repeats)] or [first_ms]
    return result, {"first_ms": round(first_ms, 3), "median_ms": round(statistics.median(times), 3),
                    "min_ms": round(min(times), 3)}


def table_total(table):
    return pc.sum(table.column("value")).as_py() or 0


def peer_results(engine, shape, query, repeats):
    """The group_by and tree records of one engine, shape and query."""
    where, params = engine.where(query)
    head = {"engine": engine.name, "version": engine.version, "shape": shape, "query": query["name"]}

    sql = group_by_sql(engine, shape, query, where)
    table, times = timings(lambda: engine.arrow_table(sql, params), repeats)
    group_by = {**head, "kind": "group_by", **times, "rows": table.num_rows, "total": table_total(table)}

    sql = tree_sql(engine, shape, query, where)

    def table_and_tree():
        table = engine.arrow_table(sql, params)
        return table, flame_tree(table)

    (table, (_, nodes)), times = timings(table_and_tree, repeats)
    tree = {**head, "kind": "tree", **times, "rows": table.num_rows, "total": table_total(table), "nodes": nodes}
    return [group_by, tree]


def open_engine(name):
    try:
        return {"duckdb": DuckDB, "chdb": ChDB}[name]()
    except ImportError as e:
        log(f"peers.py: cannot import {name} ({e}); install tests/e2e/requirements.txt into .venv")
        sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="queries.json")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s): {', '.join(unknown)}")
    engines = [open_engine(n) for n in names]  # import all before timing any

    repeats = int(spec.get("repeats", 5))
    peers = []
    for engine in engines:
        log(f"{engine.name} {engine.version}")
        for shape in SHAPES:
            for query in spec["queries"]:
                results = peer_results(engine, shape, query, repeats)
                for r in results:
                    log(f"  {shape:12} {r['kind']:8} {query['name']}: median {r['median_ms']:.1f} ms,"
                        f" first {r['first_ms']:.1f} ms, {r['rows']} rows, total {r['total']}")
                peers.extend(results)
    json.dump({"peers": peers}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
