//! Per-dataset stack totals, decoded once and kept: blocks are immutable,
//! so a flame graph that takes a dataset whole merges the cached sums of
//! its totals section instead of scanning it (or its samples) again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Int64Type, UInt64Type};
use datafusion::error::{DataFusionError, Result};
use ember_engine::block::{read_section, Section};
use ember_engine::{DatasetKey, DatasetRef};
use object_store::ObjectStore;

use crate::lru::ByteLru;

/// profile type -> (stack id, summed value), for one dataset.
pub type DatasetTotals = HashMap<String, Vec<(u64, i64)>>;

/// Keyed by [`DatasetKey`] (block, tenant, service): two tenants' datasets
/// of one service in one block are two entries. Bounded in bytes; the least
/// recently used datasets are forgotten first (forgetting only costs a read).
pub struct TotalsCache {
    inner: Mutex<ByteLru<DatasetKey, Arc<DatasetTotals>>>,
}

fn bytes_of(totals: &DatasetTotals) -> usize {
    totals
        .iter()
        .map(|(t, list)| t.len() + 64 + list.len() * 16)
        .sum::<usize>()
        + 128
}

impl TotalsCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(ByteLru::new(max_bytes)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLru<DatasetKey, Arc<DatasetTotals>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }

    /// The dataset's totals, from the cache or its totals section.
    pub async fn totals(
        &self,
        store: Arc<dyn ObjectStore>,
        d: &DatasetRef,
    ) -> Result<Arc<DatasetTotals>> {
        let key = d.key();
        if let Some(t) = self.lock().get(&key) {
            return Ok(t);
        }
        let section = d.dataset.section(Section::Totals).ok_or_else(|| {
            DataFusionError::Internal(format!("dataset in {} has no totals", d.path))
        })?;
        let batches = read_section(store, &d.path, section)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut totals = DatasetTotals::new();
        for b in &batches {
            let types = b.column(0).as_string::<i32>();
            let ids = b.column(1).as_primitive::<UInt64Type>();
            let values = b.column(2).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                let t = types.value(i);
                let list = match totals.get_mut(t) {
                    Some(l) => l,
                    None => totals.entry(t.to_string()).or_default(),
                };
                list.push((ids.value(i), values.value(i)));
            }
        }
        let totals = Arc::new(totals);
        let bytes = bytes_of(&totals);
        self.lock().insert(key, totals.clone(), bytes);
        Ok(totals)
    }
}
