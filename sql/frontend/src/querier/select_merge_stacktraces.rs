//! `SelectMergeStacktraces` and `SelectMergeSpanProfile`: the merged flame
//! graph of a selection (or of its spans), as levels or tree bytes.

use super::*;

pub(crate) async fn select_merge_stacktraces(
    state: &QueryState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeStacktracesRequest,
) -> Result<FlameGraph, ApiError> {
    with_flame_graph(state, tenant, settings, req, flame_graph).await
}

/// The merged stacks in the format asked for: a flame graph, or the tree
/// bytes when the format is `TREE`.
pub(super) async fn stacktraces(
    state: &QueryState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeStacktracesRequest,
) -> Result<(Option<FlameGraph>, Vec<u8>), ApiError> {
    if req.format == ProfileFormat::Tree as i32 {
        let tree = with_flame_graph(state, tenant, settings, req, tree_bytes).await?;
        Ok((None, tree))
    } else {
        let graph = with_flame_graph(state, tenant, settings, req, flame_graph).await?;
        Ok((Some(graph), Vec::new()))
    }
}

/// The request's flame graph laid out by `layout`: run as `flamegraph()`,
/// or `span_flamegraph()` when the request selects spans, with the same
/// checks, but without SQL around it.
async fn with_flame_graph<R: Send>(
    state: &QueryState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeStacktracesRequest,
    layout: impl FnOnce(Frame<'_>) -> Result<R, String> + Send,
) -> Result<R, ApiError> {
    unserved_selectors(
        req.stack_trace_selector.is_some(),
        &req.profile_id_selector,
        &req.trace_id_selector,
    )?;
    let max_nodes = max_nodes(req.max_nodes)?;
    let (start, end) = time_range_ms(req.start, req.end);
    let spans = if req.span_selector.is_empty() {
        None
    } else {
        let spans = req.span_selector.join(",");
        ember_sql::flamegraph::parse_span_ids(&spans)
            .map_err(|e| invalid(format!("span_selector: {e}")))?;
        Some(spans)
    };
    let call = FlameGraphCall {
        profile_type: req.profile_type_id.clone(),
        selector: selector_or_all(&req.label_selector).to_string(),
        start,
        end,
        max_nodes,
        spans,
    };
    state
        .engine
        .flame_graph(tenant, settings, call, layout)
        .await
        .map_err(|e| query_error(&e))?
        .map_err(|e| connect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))
}
