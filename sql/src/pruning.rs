//! Reads the filters DataFusion pushes into a table scan and turns those on
//! `time`, `service_name` and `profile_type` into a metastore query, so that
//! blocks and datasets that cannot match are never read.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator};

/// What the filters allow; `None` means unconstrained.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanBounds {
    pub start: i64,
    pub end: i64,
    pub services: Option<Vec<String>>,
    pub profile_types: Option<Vec<String>>,
}

impl Default for ScanBounds {
    fn default() -> Self {
        Self {
            start: i64::MIN,
            end: i64::MAX,
            services: None,
            profile_types: None,
        }
    }
}

pub fn scan_bounds(filters: &[Expr]) -> ScanBounds {
    let mut b = ScanBounds::default();
    for f in filters {
        b.apply(f);
    }
    b
}

fn column_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        Expr::Cast(c) => column_name(&c.expr),
        Expr::TryCast(c) => column_name(&c.expr),
        _ => None,
    }
}

/// Nanoseconds since the epoch of a timestamp literal.
pub fn timestamp_nanos(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(n), _) => Some(*n),
        ScalarValue::TimestampMicrosecond(Some(n), _) => n.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(n), _) => n.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(n), _) => n.checked_mul(1_000_000_000),
        _ => None,
    }
}

fn literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        Expr::Cast(c) => literal(&c.expr),
        _ => None,
    }
}

fn string(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::Utf8View(Some(s))
        | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        _ => None,
    }
}

fn intersect(current: &mut Option<Vec<String>>, values: Vec<String>) {
    *current = Some(match current.take() {
        None => values,
        Some(existing) => existing
            .into_iter()
            .filter(|v| values.contains(v))
            .collect(),
    });
}

impl ScanBounds {
    fn apply(&mut self, f: &Expr) {
        match f {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.apply(left);
                self.apply(right);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                if let (Some(col), Some(v)) = (column_name(left), literal(right)) {
                    self.compare(col, *op, v);
                } else if let (Some(v), Some(col)) = (literal(left), column_name(right)) {
                    if let Some(op) = op.swap() {
                        self.compare(col, op, v);
                    }
                }
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) => {
                if let (Some(col), Some(lo), Some(hi)) =
                    (column_name(expr), literal(low), literal(high))
                {
                    self.compare(col, Operator::GtEq, lo);
                    self.compare(col, Operator::LtEq, hi);
                }
            }
            Expr::InList(list) if !list.negated => {
                let Some(col) = column_name(&list.expr) else {
                    return;
                };
                let values: Option<Vec<String>> = list
                    .list
                    .iter()
                    .map(|e| literal(e).and_then(string))
                    .collect();
                if let Some(values) = values {
                    self.restrict(col, values);
                }
            }
            _ => {}
        }
    }

    fn restrict(&mut self, col: &str, values: Vec<String>) {
        match col {
            "service_name" => intersect(&mut self.services, values),
            "profile_type" => intersect(&mut self.profile_types, values),
            _ => {}
        }
    }

    fn compare(&mut self, col: &str, op: Operator, v: &ScalarValue) {
        if col == "time" {
            let Some(t) = timestamp_nanos(v) else { return };
            match op {
                Operator::Gt => self.start = self.start.max(t.saturating_add(1)),
                Operator::GtEq => self.start = self.start.max(t),
                Operator::Lt => self.end = self.end.min(t.saturating_sub(1)),
                Operator::LtEq => self.end = self.end.min(t),
                Operator::Eq => {
                    self.start = self.start.max(t);
                    self.end = self.end.min(t);
                }
                _ => {}
            }
        } else if op == Operator::Eq {
            if let Some(s) = string(v) {
                self.restrict(col, vec![s]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    fn ts(n: i64) -> Expr {
        lit(ScalarValue::TimestampNanosecond(
            Some(n),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn reads_time_service_and_type_bounds() {
        let b = scan_bounds(&[
            col("time").gt_eq(ts(10)).and(col("time").lt(ts(20))),
            col("service_name").eq(lit("api")),
            col("profile_type").in_list(vec![lit("a"), lit("b")], false),
            col("profile_type").eq(lit("b")),
            col("value").gt(lit(5)),
        ]);
        assert_eq!(b.start, 10);
        assert_eq!(b.end, 19);
        assert_eq!(b.services, Some(vec!["api".to_string()]));
        assert_eq!(b.profile_types, Some(vec!["b".to_string()]));
    }

    #[test]
    fn ignores_what_it_cannot_prove() {
        let b = scan_bounds(&[
            col("service_name")
                .eq(lit("a"))
                .or(col("service_name").eq(lit("b"))),
            col("time").not_eq(ts(3)),
            col("service_name").in_list(vec![lit("x")], true),
        ]);
        assert_eq!(b, ScanBounds::default());
        let b = scan_bounds(&[ts(10).lt_eq(col("time"))]);
        assert_eq!(b.start, 10);
    }
}
