//! What a profile query selects: one profile type, a label selector and a
//! time range, resolved first against the metastore's index (the datasets
//! that can match) and then as the row filter those datasets still need.
//! Flame graphs, series and pprof all select this way.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{col, lit, Expr};
use ember_engine::selector::Selector;
use ember_metastore::BlockQuery;
use ember_metastore::{DatasetRef, MetastoreIndex};

use crate::storage::index_error;

#[derive(Debug, Clone)]
pub struct ProfileSelection {
    pub tenant: String,
    pub profile_type: String,
    pub selector: Selector,
    /// Nanoseconds since the epoch, inclusive.
    pub start: i64,
    pub end: i64,
}

impl ProfileSelection {
    /// The datasets holding the type in the range with a matching series.
    pub async fn datasets(
        &self,
        index: &dyn MetastoreIndex,
        skip_level0: bool,
    ) -> datafusion::error::Result<Vec<DatasetRef>> {
        let found = index
            .datasets(&BlockQuery {
                tenant: self.tenant.clone(),
                start: self.start,
                end: self.end,
                service_names: self.selector.exact_services(),
                profile_types: Some(vec![self.profile_type.clone()]),
                skip_level0,
            })
            .await
            .map_err(index_error)?;
        Ok(found
            .into_iter()
            .filter(|d| self.selector.may_match_service(&d.dataset.service_name))
            .filter(|d| {
                d.dataset
                    .series
                    .iter()
                    .any(|s| self.selector.matches_series(s))
            })
            .collect())
    }

    /// The row filter the `datasets` still need: a condition that every
    /// chosen dataset meets whole is left out, so the common case (one
    /// service's type over its whole range) scans without filtering a row.
    pub fn row_filter(&self, datasets: &[DatasetRef]) -> Option<Expr> {
        let mut conditions = Vec::new();
        if datasets.iter().any(|d| {
            d.dataset
                .profile_types
                .iter()
                .any(|t| *t != self.profile_type)
        }) {
            conditions.push(col("profile_type").eq(lit(self.profile_type.clone())));
        }
        if datasets.iter().any(|d| d.dataset.min_time < self.start) {
            conditions.push(col("time").gt_eq(utc_nanos(self.start)));
        }
        if datasets.iter().any(|d| d.dataset.max_time > self.end) {
            conditions.push(col("time").lt_eq(utc_nanos(self.end)));
        }
        let mut all: Vec<&String> = datasets
            .iter()
            .flat_map(|d| d.dataset.series.iter())
            .collect();
        all.sort();
        all.dedup();
        let matching: Vec<Expr> = all
            .iter()
            .filter(|s| self.selector.matches_series(s))
            .map(|s| lit(s.as_str()))
            .collect();
        if matching.len() < all.len() {
            conditions.push(col("labels").in_list(matching, false));
        }
        conjunction(conditions)
    }
}

pub fn utc_nanos(n: i64) -> Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(n),
        Some("UTC".into()),
    ))
}
