//! `Diff`: two selections' flame graphs side by side.

use super::*;

pub(crate) async fn diff(
    state: &QueryState,
    tenant: &str,
    settings: &Settings,
    left: &SelectMergeStacktracesRequest,
    right: &SelectMergeStacktracesRequest,
) -> Result<FlameGraphDiff, ApiError> {
    if left.profile_type_id != right.profile_type_id {
        return Err(invalid("profile types must match"));
    }
    let max_nodes = max_nodes(left.max_nodes.or(right.max_nodes))?;
    let side = |req: &SelectMergeStacktracesRequest| {
        let (start, end) = time_range_ms(req.start, req.end);
        FlameGraphCall {
            profile_type: req.profile_type_id.clone(),
            selector: selector_or_all(&req.label_selector).to_string(),
            start,
            end,
            max_nodes,
            spans: None,
        }
    };
    let frame = state
        .engine
        .diff_flame_graph(tenant, settings, side(left), side(right))
        .await
        .map_err(|e| query_error(&e))?;
    flame_graph_diff(std::slice::from_ref(&frame))
        .map_err(|e| connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))
}
