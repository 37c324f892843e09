//! `SelectSeries`: a selection's totals over time, per group.

use super::*;

pub(crate) async fn select_series(
    state: &QueryState,
    tenant: &str,
    settings: &Settings,
    req: SelectSeriesRequest,
) -> Result<Vec<Series>, ApiError> {
    if req.stack_trace_selector.is_some() {
        return Err(unimplemented("stack trace selectors are not served yet"));
    }
    if !(req.step.is_finite() && req.step > 0.0 && req.step < 1e10) {
        return Err(invalid(format!(
            "step {} must be a positive number of seconds",
            req.step
        )));
    }
    let selector = Selector::parse(selector_or_all(&req.label_selector))
        .map_err(|e| invalid(format!("label_selector: {e}")))?;
    let (start, end) = time_range_ms(req.start, req.end);
    let aggregation = match req.aggregation {
        None | Some(0) => Aggregation::Sum,
        Some(1) => Aggregation::Average,
        Some(other) => return Err(invalid(format!("aggregation {other} is unknown"))),
    };
    let limit = match req.limit {
        None | Some(0) => None,
        Some(n) => Some(usize::try_from(n).map_err(|_| invalid(format!("limit {n} is negative")))?),
    };
    let q = SeriesQuery {
        selection: ProfileSelection {
            tenant: tenant.to_string(),
            profile_type: req.profile_type_id,
            selector,
            start: start.saturating_mul(1_000_000),
            end: end.saturating_mul(1_000_000),
        },
        step_nanos: (req.step * 1e9).round() as i64,
        group_by: req.group_by,
        aggregation,
        limit,
    };
    q.check().map_err(invalid)?;
    let series = state
        .engine
        .select_series(&q, settings)
        .await
        .map_err(|e| query_error(&e))?;
    Ok(series
        .into_iter()
        .map(|s| Series {
            labels: s
                .labels
                .into_iter()
                .map(|(name, value)| LabelPair { name, value })
                .collect(),
            points: s
                .points
                .into_iter()
                .map(|p| Point {
                    value: p.value,
                    timestamp: p.time_ms,
                    ..Point::default()
                })
                .collect(),
        })
        .collect())
}
