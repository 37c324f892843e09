//! Ember's table functions over profiles, in one list: every tenant's
//! session registers them from it, and the SQL editor's function lists
//! name them from it.

use std::sync::Arc;

use datafusion::catalog::TableFunctionImpl;
use datafusion::prelude::SessionContext;

use crate::diff::DiffFunction;
use crate::flamegraph::FlameGraphFunction;
use crate::labels::LabelFunction;
use crate::pprof::PprofFunction;
use crate::series::SeriesFunction;
use crate::storage::Storage;

/// A function bound to what it reads and to its tenant.
type Bind = fn(&Storage, String) -> Arc<dyn TableFunctionImpl>;

const FUNCTIONS: [(&str, Bind); 7] = [
    ("diff_flamegraph", |s, t| {
        Arc::new(DiffFunction::new(s.clone(), t))
    }),
    ("flamegraph", |s, t| {
        Arc::new(FlameGraphFunction::new(s.clone(), t))
    }),
    ("label_names", |s, t| {
        Arc::new(LabelFunction::names(s.index.clone(), t))
    }),
    ("label_values", |s, t| {
        Arc::new(LabelFunction::values(s.index.clone(), t))
    }),
    ("pprof", |s, t| Arc::new(PprofFunction::new(s.clone(), t))),
    ("series", |s, t| {
        Arc::new(SeriesFunction::new(s.store.clone(), s.index.clone(), t))
    }),
    ("span_flamegraph", |s, t| {
        Arc::new(FlameGraphFunction::of_spans(s.clone(), t))
    }),
];

/// The names of Ember's table functions, sorted.
pub fn profile_function_names() -> impl Iterator<Item = &'static str> {
    FUNCTIONS.iter().map(|(name, _)| *name)
}

/// Registers every function in `ctx`, reading `storage` as `tenant`.
pub(crate) fn register(ctx: &SessionContext, storage: &Storage, tenant: &str) {
    for (name, bind) in FUNCTIONS {
        ctx.register_udtf(name, bind(storage, tenant.to_string()));
    }
}
