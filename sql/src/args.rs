//! Constant arguments of table functions. Grafana's macros expand to
//! expressions such as `cast('2026-11-24T10:00:00Z' as timestamp)`, so each
//! argument is simplified to a literal first.

use datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use datafusion::catalog::Session;
use datafusion::common::{plan_err, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::Expr;
use datafusion::optimizer::simplify_expressions::ExprSimplifier;

use crate::pruning::timestamp_nanos;

pub fn literals(function: &str, exprs: &[Expr], session: &dyn Session) -> Result<Vec<ScalarValue>> {
    let ctx = SimplifyContext::builder()
        .with_config_options(session.config().options().clone())
        .with_current_time()
        .build();
    let simplifier = ExprSimplifier::new(ctx);
    exprs
        .iter()
        .enumerate()
        .map(|(i, e)| match simplifier.simplify(e.clone())? {
            Expr::Literal(v, _) => Ok(v),
            other => plan_err!(
                "{function}: argument {} must be a constant, got {other}",
                i + 1
            ),
        })
        .collect()
}

pub fn string_arg(function: &str, name: &str, v: &ScalarValue) -> Result<String> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Ok(s.clone()),
        other => plan_err!("{function}: {name} must be a string, got {other:?}"),
    }
}

/// Epoch milliseconds (any integer), a timestamp, or a timestamp string.
pub fn time_arg(function: &str, name: &str, v: &ScalarValue) -> Result<i64> {
    if let Some(n) = timestamp_nanos(v) {
        return Ok(n);
    }
    let millis = match v {
        ScalarValue::Int64(Some(n)) => Some(*n),
        ScalarValue::Int32(Some(n)) => Some(i64::from(*n)),
        ScalarValue::UInt64(Some(n)) => i64::try_from(*n).ok(),
        ScalarValue::UInt32(Some(n)) => Some(i64::from(*n)),
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => {
            if let Ok(n) = s.trim().parse::<i64>() {
                Some(n)
            } else {
                return string_to_timestamp_nanos(s)
                    .or_else(|e| plan_err!("{function}: {name} {s:?} is not a time: {e}"));
            }
        }
        _ => None,
    };
    match millis.map(|m| m.saturating_mul(1_000_000)) {
        Some(n) => Ok(n),
        None => {
            plan_err!("{function}: {name} must be epoch milliseconds or a timestamp, got {v:?}")
        }
    }
}

pub fn count_arg(function: &str, name: &str, v: &ScalarValue) -> Result<usize> {
    let n = match v {
        ScalarValue::Int64(Some(n)) => usize::try_from(*n).ok(),
        ScalarValue::Int32(Some(n)) => usize::try_from(*n).ok(),
        ScalarValue::UInt64(Some(n)) => usize::try_from(*n).ok(),
        ScalarValue::UInt32(Some(n)) => usize::try_from(*n).ok(),
        _ => None,
    };
    match n {
        Some(n) if n > 0 => Ok(n),
        _ => plan_err!("{function}: {name} must be a positive integer, got {v:?}"),
    }
}
