//! Statements as a client writes them, for the fuzz targets (fuzz/) and the
//! replay of their corpora: `flamegraph_args` takes any text as the
//! arguments of `flamegraph(...)`; `sql_statement` reads the bytes as the
//! choices of a grammar of statements (deep and wide expressions, every
//! function DataFusion registers with extreme arguments, subqueries, huge
//! literals). Each is planned and run under the engine's limits and must
//! end in a value or an error: a panic, a stack overflow or an allocation
//! past the fuzzer's bound is a finding.

use std::sync::{Arc, OnceLock};

use ember_metastore::Metastore;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;

use ember_sql::{ErrorKind, QueryEngine, QueryEngineConfig, Settings};

struct Harness {
    runtime: tokio::runtime::Runtime,
    engine: QueryEngine,
    functions: Vec<String>,
}

fn harness() -> Option<&'static Harness> {
    static H: OnceLock<Option<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-sql-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let store = Arc::new(LocalFileSystem::new_with_prefix(&dir).ok()?);
        let metastore = Arc::new(Metastore::open(&dir.join("metastore.redb")).ok()?);
        let config = QueryEngineConfig {
            memory_limit: 256 << 20,
            target_partitions: 1,
            query_timeout: std::time::Duration::from_secs(5),
            ..QueryEngineConfig::default()
        };
        let engine = QueryEngine::new(store, metastore, config).ok()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let functions = runtime.block_on(engine.function_names("fuzz")).ok()?;
        Some(Harness {
            runtime,
            engine,
            functions,
        })
    })
    .as_ref()
}

/// `SELECT * FROM flamegraph(<data>)`, planned and run.
pub fn flamegraph_args(data: &[u8]) {
    let Ok(args) = std::str::from_utf8(data) else {
        return;
    };
    if args.len() > 4096 {
        return;
    }
    let Some(h) = harness() else {
        return;
    };
    let sql = format!("SELECT * FROM flamegraph({args})");
    h.runtime.block_on(async {
        run(&h.engine, &sql).await;
    });
}

/// Runs `sql`; a query that panicked (caught on the query threads and
/// reported as an internal error) panics here, for the fuzzer to see.
async fn run(engine: &QueryEngine, sql: &str) {
    let outcome = match engine.execute("fuzz", sql, &Settings::default()).await {
        Ok(stream) => stream
            .try_collect::<Vec<_>>()
            .await
            .map(drop)
            .map_err(ember_sql::SqlError::from),
        Err(e) => Err(e),
    };
    let Err(e) = outcome else { return };
    if e.kind() == ErrorKind::Internal && e.to_string().contains("the query failed") {
        panic!("{sql}: {e}");
    }
    // A query past its timeout must stop and leave the query threads to
    // the next one.
    if e.kind() == ErrorKind::DeadlineExceeded {
        let next = engine
            .execute("fuzz", "SELECT 1", &Settings::default())
            .await;
        if next.is_err() {
            panic!("{sql}: kept the query threads busy past its timeout");
        }
    }
}

/// The statement `data` chooses from the grammar, planned and run.
pub fn sql_statement(data: &[u8]) {
    let Some(h) = harness() else {
        return;
    };
    let sql = statement_of(data, &h.functions);
    h.runtime.block_on(run(&h.engine, &sql));
}

/// The statement `data` chooses, over `functions` (every scalar,
/// aggregate and table function the sessions have).
pub fn statement_of(data: &[u8], functions: &[String]) -> String {
    let mut g = Grammar {
        data,
        at: 0,
        depth: 0,
        budget: STATEMENT_BUDGET,
        functions,
        ctes: 0,
    };
    g.statement()
}

/// Reads the fuzzer's bytes as choices; past their end every choice is 0,
/// which always leads to a leaf.
struct Grammar<'a> {
    data: &'a [u8],
    at: usize,
    depth: usize,
    /// Bytes the long parts (chains, literals, lists) may still add.
    budget: usize,
    functions: &'a [String],
    /// CTEs in scope, named `c0`, `c1`...
    ctes: usize,
}

/// About twice the engine's statement limit: long enough to reach it, and
/// no statement costs the harness itself more than a few megabytes.
const STATEMENT_BUDGET: usize = 2 << 20;

/// Values at the edges of their types and sizes.
const LITERALS: &[&str] = &[
    "0",
    "1",
    "-1",
    "NULL",
    "2000000000",
    "1000000000",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "1e308",
    "-0.0",
    "'NaN'",
    "''",
    "'x'",
    "'ab%_\\'",
    "'\u{1F525}'",
    "true",
    "[1, 2, 3]",
    "[]",
    "make_array(NULL)",
    "interval '1 second'",
    "interval '-1 month'",
    "timestamp '2026-01-01T00:00:00Z'",
    "date '1970-01-01'",
    "date '9999-12-31'",
    "x'00ff'",
    "'{service_name=\"api\"}'",
    "'process_cpu:cpu:nanoseconds:cpu:nanoseconds'",
    "value",
    "stack_id",
    "service_name",
    "time",
];

const OPERATORS: &[&str] = &[
    "+",
    "-",
    "*",
    "/",
    "%",
    "||",
    "AND",
    "OR",
    "=",
    "<>",
    "<",
    ">=",
    "LIKE",
    "IS DISTINCT FROM",
    "&",
    "|",
    "<<",
    ">>",
    "@>",
];

const TABLES: &[&str] = &[
    "samples",
    "profiles",
    "stacks",
    "series",
    "system.blocks",
    "generate_series(1, 3)",
    "range(0, 10, 3)",
    "flamegraph('process_cpu:cpu:nanoseconds:cpu:nanoseconds', '{}', 0, 9999999999999)",
    "unnest([1, 2, 3])",
];

const TYPES: &[&str] = &[
    "BIGINT",
    "INT",
    "DOUBLE",
    "VARCHAR",
    "TIMESTAMP",
    "DATE",
    "BOOLEAN",
    "DECIMAL(38, 10)",
    "BIGINT[]",
    "INTERVAL",
];

impl Grammar<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn choose(&mut self, n: usize) -> usize {
        let mut choice = self.byte() as usize;
        if n > 256 {
            choice = choice << 8 | self.byte() as usize;
        }
        choice % n.max(1)
    }

    /// `n` repeats of `bytes` each, or as many as the budget still allows.
    fn long(&mut self, n: usize, bytes: usize) -> usize {
        let n = n.min(self.budget / bytes.max(1));
        self.budget -= n * bytes.max(1);
        n
    }

    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[self.choose(from.len())]
    }

    /// A query, sometimes with a CTE that its tables may name many times
    /// (the planner plans a CTE again at each reference).
    fn statement(&mut self) -> String {
        if self.choose(6) != 0 || self.depth >= 4 {
            return self.select();
        }
        self.depth += 1;
        let cte = self.select();
        let name = format!("c{}", self.ctes);
        self.ctes += 1;
        let body = self.select();
        self.ctes -= 1;
        self.depth -= 1;
        format!("WITH {name} AS ({cte}) {body}")
    }

    fn select(&mut self) -> String {
        let columns = (0..=self.choose(3))
            .map(|_| self.expr())
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = format!("SELECT {columns}");
        if self.choose(2) == 1 {
            let table = self.table();
            sql.push_str(&format!(" FROM {table}"));
            if self.choose(2) == 1 {
                let filter = self.expr();
                sql.push_str(&format!(" WHERE {filter}"));
            }
            if self.choose(3) == 1 {
                sql.push_str(" GROUP BY 1");
            }
        }
        if self.choose(3) == 1 {
            let n = self.pick(&["0", "1", "100", "9223372036854775807"]);
            sql.push_str(&format!(" LIMIT {n}"));
        }
        sql
    }

    fn table(&mut self) -> String {
        if self.ctes > 0 && self.choose(3) == 0 {
            let cte = self.choose(self.ctes);
            let n = 1 + self.byte() as usize;
            let n = self.long(n, 12);
            let references = (0..n.max(1))
                .map(|i| format!("c{cte} AS r{i}"))
                .collect::<Vec<_>>();
            return references.join(", ");
        }
        if self.choose(4) == 0 && self.depth < 4 {
            self.depth += 1;
            let inner = self.statement();
            self.depth -= 1;
            return format!("({inner}) AS t");
        }
        self.pick(TABLES).to_string()
    }

    fn expr(&mut self) -> String {
        if self.depth > 8 {
            return self.pick(LITERALS).to_string();
        }
        self.depth += 1;
        let e = match self.choose(10) {
            0 | 1 => self.pick(LITERALS).to_string(),
            2 | 3 => {
                let name = self.functions[self.choose(self.functions.len())].clone();
                let args = (0..self.choose(5))
                    .map(|_| self.expr())
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{name}({args})")
            }
            // A chain up to thousands long: deep for the planner.
            4 => {
                let op = self.pick(OPERATORS);
                let term = self.expr();
                let n = self.byte() as usize * (1 + self.choose(16));
                let n = self.long(n, term.len() + op.len() + 2);
                let mut chain = term.clone();
                for _ in 0..n {
                    chain.push_str(&format!(" {op} {term}"));
                }
                chain
            }
            5 => {
                let (a, b, c) = (self.expr(), self.expr(), self.expr());
                format!("CASE WHEN {a} THEN {b} ELSE {c} END")
            }
            6 => {
                let (e, t) = (self.expr(), self.pick(TYPES));
                format!("CAST({e} AS {t})")
            }
            7 => {
                let e = self.expr();
                let n = self.byte() as usize * 64;
                let n = self.long(n, 6);
                let list = (0..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
                format!("{e} IN ({list})")
            }
            8 => {
                let inner = self.statement();
                format!("({inner})")
            }
            _ => {
                let n = self.byte() as usize * 1024;
                let n = self.long(n, 1);
                format!("'{}'", "y".repeat(n))
            }
        };
        self.depth -= 1;
        e
    }
}
