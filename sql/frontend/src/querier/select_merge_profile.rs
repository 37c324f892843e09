//! `SelectMergeProfile`: the merged profile of a selection as a pprof
//! `google.v1.Profile`.

use super::*;

pub(super) async fn select_merge_profile(
    state: &QueryState,
    tenant: &str,
    settings: &Settings,
    req: &SelectMergeProfileRequest,
) -> Result<Vec<u8>, ApiError> {
    unserved_selectors(
        req.stack_trace_selector.is_some(),
        &req.profile_id_selector,
        &req.trace_id_selector,
    )?;
    let (start, end) = time_range_ms(req.start, req.end);
    let call = FlameGraphCall {
        profile_type: req.profile_type_id.clone(),
        selector: selector_or_all(&req.label_selector).to_string(),
        start,
        end,
        max_nodes: max_nodes(req.max_nodes)?,
        spans: None,
    };
    state
        .engine
        .merged_profile(tenant, settings, call)
        .await
        .map_err(|e| query_error(&e))
}
