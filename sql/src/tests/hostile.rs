//! Statements a hostile or careless client sends: each gets a typed error
//! or its answer, and nothing else happens to the process.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use futures::TryStreamExt;

use super::{engine_with, profiles, run};
use crate::{ErrorKind, QueryEngine, Settings, SqlError};

async fn outcome(engine: &QueryEngine, sql: &str) -> Result<Vec<super::RecordBatch>, SqlError> {
    engine
        .execute("t", sql, &Settings::default())
        .await?
        .try_collect()
        .await
        .map_err(SqlError::from)
}

fn first_i64(batches: &[super::RecordBatch]) -> i64 {
    let column = cast(batches[0].column(0), &DataType::Int64).unwrap();
    column.as_primitive::<Int64Type>().value(0)
}

#[tokio::test]
async fn long_operator_chains_answer_or_are_refused_without_harm() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    // A left-deep chain of 1,000 terms overflowed a worker's stack before.
    for terms in [500, 1_000] {
        let sql = format!("SELECT 1{}", "+1".repeat(terms));
        assert_eq!(first_i64(&run(&engine, "t", &sql).await), terms as i64 + 1);
    }
    for terms in [1_024, 100_000] {
        let sql = format!("SELECT 1{}", "+1".repeat(terms));
        let err = outcome(&engine, &sql).await.expect_err("too deep");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("nests deeper than"), "{err}");
    }
    // The engine still answers.
    assert_eq!(first_i64(&run(&engine, "t", "SELECT 41 + 1").await), 42);
}

#[tokio::test]
async fn long_or_lists_answer_as_in_lists_do() {
    let (_dir, engine) =
        engine_with(vec![profiles("go-heap-large.pb.gz", "heap", "t")], 1 << 30).await;
    for n in [1_000, 20_000] {
        let or = (0..n)
            .map(|v| format!("value = {v}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let list = (0..n).map(|v| v.to_string()).collect::<Vec<_>>().join(",");
        let by_or = run(
            &engine,
            "t",
            &format!("SELECT count(*) FROM samples WHERE {or}"),
        )
        .await;
        let by_in = run(
            &engine,
            "t",
            &format!("SELECT count(*) FROM samples WHERE value IN ({list})"),
        )
        .await;
        assert_eq!(first_i64(&by_or), first_i64(&by_in), "{n} terms");
        let all = run(&engine, "t", "SELECT count(*) FROM samples").await;
        assert!(
            first_i64(&by_or) < first_i64(&all),
            "the filter must filter"
        );
    }
}

#[tokio::test]
async fn functions_that_would_build_more_than_the_memory_bound_are_refused() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    for sql in [
        "SELECT length(repeat('x', 1000000000))",
        "SELECT cardinality(generate_series(1, 2000000000))",
        "SELECT cardinality(range(0, 2000000000, 1))",
        "SELECT length(lpad('x', 1000000000))",
        "SELECT cardinality(array_repeat(1, 1000000000))",
        "SELECT cardinality(array_resize([1], 1000000000, 0))",
        "SELECT cardinality(generate_series(DATE '1970-01-01', DATE '9999-01-01', INTERVAL '1 second'))",
        // Each step doubles the last: the output tells.
        "WITH a AS (SELECT repeat('x', 1000000) s), b AS (SELECT concat(s, s) s FROM a), \
         c AS (SELECT concat(s, s) s FROM b), d AS (SELECT concat(s, s) s FROM c), \
         e AS (SELECT concat(s, s) s FROM d), f AS (SELECT concat(s, s) s FROM e), \
         g AS (SELECT concat(s, s) s FROM f), h AS (SELECT concat(s, s) s FROM g) \
         SELECT length(s) FROM h",
        "WITH a AS (SELECT repeat('x', 1000000) s), b AS (SELECT s || s s FROM a), \
         c AS (SELECT s || s s FROM b), d AS (SELECT s || s s FROM c), \
         e AS (SELECT s || s s FROM d), f AS (SELECT s || s s FROM e), \
         g AS (SELECT s || s s FROM f), h AS (SELECT s || s s FROM g) \
         SELECT length(s) FROM h",
    ] {
        let err = outcome(&engine, sql).await.expect_err(sql);
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{sql}: {err}");
        assert!(err.to_string().contains("memory"), "{err}");
    }
    // Within the bound they answer as DataFusion's own do.
    for (sql, want) in [
        ("SELECT length(repeat('ab', 5))", 10),
        ("SELECT cardinality(generate_series(1, 1000))", 1000),
        ("SELECT cardinality(range(1, 1000))", 999),
        ("SELECT length(rpad('x', 7))", 7),
        ("SELECT cardinality(array_repeat('a', 3))", 3),
        ("SELECT length('ab' || 'cde')", 5),
        (
            "SELECT count(*) FROM (SELECT 'a' || NULL AS s) WHERE s IS NULL",
            1,
        ),
        ("SELECT cardinality([1] || [2, 3])", 3),
    ] {
        assert_eq!(first_i64(&run(&engine, "t", sql).await), want, "{sql}");
    }
}

#[tokio::test]
async fn text_concatenation_keeps_the_operators_name() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    let batches = run(&engine, "t", "SELECT 'ab' || 'c'").await;
    assert_eq!(
        batches[0].schema().field(0).name(),
        "Utf8(\"ab\") || Utf8(\"c\")"
    );
}

/// A chain of `||` over text is one call over its operands: planned as
/// nested calls, 440 terms took 33 s (each call named its whole subtree
/// again). Lists are still nested calls, hence the chain limit.
#[tokio::test]
async fn long_text_concatenations_answer_and_keep_null_semantics() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    let n = crate::statement::MAX_FUNCTION_CHAIN;
    let terms: Vec<String> = (0..n).map(|i| format!("'{}'", i % 10)).collect();
    let sql = format!("SELECT {} AS s", terms.join(" || "));
    let batches = run(&engine, "t", &sql).await;
    let expected: String = (0..n).map(|i| char::from(b'0' + (i % 10) as u8)).collect();
    assert_eq!(batches[0].column(0).as_string::<i32>().value(0), expected);
    let batches = run(&engine, "t", "SELECT 'a' || NULL || 'b' AS s").await;
    assert!(batches[0].column(0).is_null(0));
    let batches = run(&engine, "t", "SELECT 'a' || 'b' || 'c' AS s").await;
    assert_eq!(batches[0].column(0).as_string::<i32>().value(0), "abc");
    let lists = vec!["[1, 2]"; n].join(" || ");
    let batches = run(&engine, "t", &format!("SELECT cardinality({lists}) AS n")).await;
    assert_eq!(first_i64(&batches), 2 * n as i64);
}

#[tokio::test]
async fn the_announced_schema_is_the_streamed_one() {
    let (_dir, engine) =
        engine_with(vec![profiles("go-heap-large.pb.gz", "heap", "t")], 1 << 30).await;
    for sql in [
        "SELECT repeat('x', 3) AS r",
        "SELECT length(repeat('x', 10))",
        "SELECT generate_series(1, 3)",
        "SELECT 1 + 1",
        "SELECT now()",
        "SELECT service_name, count(*) FROM samples GROUP BY 1",
    ] {
        let announced = engine
            .describe("t", sql, &Settings::default(), Vec::new())
            .await
            .unwrap()
            .columns;
        let stream = engine
            .execute("t", sql, &Settings::default())
            .await
            .unwrap();
        assert_eq!(stream.schema(), announced, "{sql}");
        let batches: Vec<_> = stream.try_collect().await.unwrap();
        for b in &batches {
            assert_eq!(b.schema(), announced, "{sql}");
        }
    }
}

#[tokio::test]
async fn a_timeout_is_a_deadline_not_a_memory_error() {
    let config = crate::QueryEngineConfig {
        query_timeout: std::time::Duration::from_millis(200),
        ..crate::QueryEngineConfig::default()
    };
    let (_dir, engine) = super::engine_with_config(vec![], config).await;
    let sql = "SELECT count(*) FROM generate_series(1, 10000000000) a";
    let err = outcome(&engine, sql).await.expect_err("times out");
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(!err.to_string().contains("memory"), "{err}");
}

/// Compiling a regular expression can cost its length squared: a 130 KB
/// pattern held the fuzz harness's query thread for minutes.
#[tokio::test]
async fn regular_expressions_longer_than_the_pattern_limit_are_refused() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    let n = crate::MAX_PATTERN_BYTES;
    for function in [
        "regexp_count",
        "regexp_like",
        "regexp_match",
        "regexp_instr",
    ] {
        for pattern in [
            format!("repeat('y', {})", n + 1),
            // Type coercion casts to text after the bound sees the pattern.
            format!("CAST(repeat('y', {}) AS BYTEA)", n + 1),
        ] {
            let sql = format!("SELECT {function}('yyyy', {pattern})");
            let err = outcome(&engine, &sql).await.expect_err("pattern too long");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{sql}: {err}");
            // Refused for its length, or (binary, by some functions) for
            // its type: never compiled.
            let text = err.to_string();
            assert!(
                text.contains("regular expression of") || text.contains("Binary"),
                "{sql}: {text}"
            );
        }
    }
    let sql = format!(
        "SELECT regexp_replace('yyyy', '{}', 'x')",
        "y".repeat(n + 1)
    );
    let err = outcome(&engine, &sql).await.expect_err("pattern too long");
    assert!(
        err.to_string().contains("longer than the 4096 bytes"),
        "{err}"
    );
    let sql = format!(
        "SELECT regexp_count('{}', '{}')",
        "y".repeat(n),
        "y".repeat(n)
    );
    assert_eq!(first_i64(&run(&engine, "t", &sql).await), 1);
    assert_eq!(
        first_i64(&run(&engine, "t", "SELECT regexp_count('abcabc', 'b')").await),
        2
    );
}

/// The operators `~ ~* !~ !~*` and `SIMILAR TO` are Arrow kernels, not
/// functions: their patterns are bounded too, whether written out or
/// computed row by row (a 32 KiB one took 43 s to compile).
#[tokio::test]
async fn regular_expression_operators_refuse_long_patterns() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    let long = crate::MAX_PATTERN_BYTES + 1;
    for op in ["~", "~*", "!~", "!~*", "SIMILAR TO", "NOT SIMILAR TO"] {
        for sql in [
            format!("SELECT 'yyyy' {op} '{}'", "y".repeat(long)),
            format!("SELECT 'yyyy' {op} p FROM (VALUES (repeat('y', {long}))) AS t(p)"),
            format!(
                "SELECT count(*) FROM (VALUES ('yyyy')) AS t(s) \
                 WHERE s {op} repeat('y', {long})"
            ),
        ] {
            let err = outcome(&engine, &sql).await.expect_err("pattern too long");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{sql}: {err}");
            assert!(
                err.to_string().contains("regular expression of"),
                "{sql}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn bounded_regular_expression_operators_keep_their_names_and_answers() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    let sql = "SELECT 'abc' ~ 'B', 'abc' ~* 'B', 'abc' !~ 'B', 'abc' !~* 'B', \
               'abc' SIMILAR TO 'abc', s ~ p \
               FROM (VALUES ('abc', 'b'), (NULL, 'b'), ('abc', NULL), ('abc', '^b')) AS t(s, p)";
    let batches = run(&engine, "t", sql).await;
    let schema = batches[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names[0], "Utf8(\"abc\") ~ Utf8(\"B\")");
    assert_eq!(names[5], "t.s ~ t.p");
    let column = |i: usize| -> Vec<Option<bool>> {
        batches
            .iter()
            .flat_map(|b| b.column(i).as_boolean().iter().collect::<Vec<_>>())
            .collect()
    };
    assert_eq!(column(0)[0], Some(false));
    assert_eq!(column(1)[0], Some(true));
    assert_eq!(column(2)[0], Some(true));
    assert_eq!(column(3)[0], Some(false));
    assert_eq!(column(4)[0], Some(true));
    assert_eq!(column(5), vec![Some(true), None, None, Some(false)]);
    let pattern = "y".repeat(crate::MAX_PATTERN_BYTES);
    let sql = format!("SELECT count(*) FROM (VALUES ('{pattern}')) AS t(s) WHERE s ~ '{pattern}'");
    assert_eq!(first_i64(&run(&engine, "t", &sql).await), 1);
}

/// Matching costs up to the text's length times the pattern's: a 4 KiB
/// pattern of one letter over 73 KiB of it, once a row, held the fuzz
/// harness's query thread past its timeout.
#[tokio::test]
async fn matching_that_would_take_too_long_is_refused() {
    let (_dir, engine) = engine_with(vec![], 1 << 30).await;
    let text = "repeat('y', 74752)";
    let pattern = format!("repeat('y', {})", crate::MAX_PATTERN_BYTES);
    for sql in [
        format!("SELECT regexp_count({text}, {pattern})"),
        format!("SELECT {text} ~ {pattern}"),
        format!("SELECT count(*) FROM (VALUES ({text})) AS t(s) WHERE s SIMILAR TO {pattern}"),
    ] {
        let err = outcome(&engine, &sql).await.expect_err("too much matching");
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{sql}: {err}");
        assert!(err.to_string().contains("would take too long"), "{err}");
    }
    // The same pattern over a text a sixth as long is work it may do.
    let sql = format!("SELECT regexp_count(repeat('y', 12288), {pattern})");
    assert_eq!(first_i64(&run(&engine, "t", &sql).await), 3);
}

#[tokio::test]
async fn a_cte_referenced_many_times_answers_or_is_refused_before_planning() {
    let (_dir, engine) =
        engine_with(vec![profiles("go-heap-large.pb.gz", "heap", "t")], 1 << 30).await;
    let samples = first_i64(&run(&engine, "t", "SELECT count(*) FROM samples").await);
    let few = "WITH s AS (SELECT value FROM samples), \
               c AS (SELECT count(*) AS n FROM s) \
               SELECT a.n + b.n FROM c a, c b";
    assert_eq!(first_i64(&run(&engine, "t", few).await), 2 * samples);
    // Planned once per reference: forty references to a 700-term chain held
    // a query thread for 54 s in a debug build, inside planning.
    let tables: Vec<String> = (1..=40).map(|i| format!("t t{i}")).collect();
    let sql = format!(
        "WITH t AS (SELECT 1{} AS v) SELECT count(*) FROM {}",
        " + 1".repeat(700),
        tables.join(", ")
    );
    let err = outcome(&engine, &sql).await.expect_err("too costly");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("--max-expression-cost"), "{err}");
    assert_eq!(first_i64(&run(&engine, "t", "SELECT 41 + 1").await), 42);
}
