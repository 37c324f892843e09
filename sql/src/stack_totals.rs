//! Per-dataset stack totals, decoded once and kept: blocks are immutable,
//! so a flame graph that takes a dataset whole merges the cached sums of
//! its totals section instead of scanning it (or its samples) again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Int64Type, UInt64Type};
use datafusion::error::{DataFusionError, Result};
use ember_engine::block::{read_section, Section};
use ember_engine::DatasetRef;
use object_store::ObjectStore;

/// profile type -> (stack id, summed value), for one dataset.
pub type DatasetTotals = HashMap<String, Vec<(u64, i64)>>;

type Key = (Arc<str>, String);

struct Inner {
    totals: HashMap<Key, Arc<DatasetTotals>>,
    entries: usize,
}

/// Holds at most `max_entries` (stack, value) pairs, about 16 bytes each;
/// emptied when full (it only saves reads, so forgetting is always safe).
pub struct TotalsCache {
    inner: Mutex<Inner>,
    max_entries: usize,
}

impl TotalsCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                totals: HashMap::new(),
                entries: 0,
            }),
            max_entries,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dataset's totals, from the cache or its totals section.
    pub async fn totals(
        &self,
        store: Arc<dyn ObjectStore>,
        d: &DatasetRef,
    ) -> Result<Arc<DatasetTotals>> {
        let key: Key = (d.block_id.clone(), d.dataset.service_name.clone());
        if let Some(t) = self.lock().totals.get(&key) {
            return Ok(t.clone());
        }
        let section = d.dataset.section(Section::Totals).ok_or_else(|| {
            DataFusionError::Internal(format!("dataset in {} has no totals", d.path))
        })?;
        let batches = read_section(store, &d.path, section)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut totals = DatasetTotals::new();
        let mut entries = 0;
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
                entries += 1;
            }
        }
        let totals = Arc::new(totals);
        let mut inner = self.lock();
        if inner.entries + entries > self.max_entries {
            inner.totals.clear();
            inner.entries = 0;
        }
        if entries <= self.max_entries {
            inner.entries += entries;
            inner.totals.insert(key, totals.clone());
        }
        Ok(totals)
    }
}
