//! Per-dataset stack totals, decoded once and kept: blocks are immutable,
//! so a flame graph that takes a dataset whole merges the cached sums of
//! its totals section instead of scanning it (or its samples) again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int32Type, Int64Type, SchemaRef, UInt64Type};
use datafusion::error::{DataFusionError, Result};
use ember_engine::block::{read_section_as, Section};
use ember_metastore::{DatasetKey, DatasetRef};
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
        let batches = read_section_as(store, &d.path, section, Some(totals_read_schema()))
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut totals = DatasetTotals::new();
        for b in &batches {
            add_batch(&mut totals, b)?;
        }
        let totals = Arc::new(totals);
        let bytes = bytes_of(&totals);
        self.lock().insert(key, totals.clone(), bytes);
        Ok(totals)
    }
}

/// The totals section as the cache reads it: the profile type, the same on
/// every row of a run, as a dictionary.
fn totals_read_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| Section::Totals.schema_with_dictionaries(&["profile_type"]))
        .clone()
}

/// Adds a batch of the totals section to `totals`, one map lookup per run
/// of rows of one profile type (the section is sorted by type).
fn add_batch(totals: &mut DatasetTotals, b: &RecordBatch) -> Result<()> {
    let wrong = || DataFusionError::Internal("totals batch is not (dictionary, u64, i64)".into());
    let types = b
        .column(0)
        .as_dictionary_opt::<Int32Type>()
        .ok_or_else(wrong)?;
    let names = types.values().as_string_opt::<i32>().ok_or_else(wrong)?;
    let ids = b
        .column(1)
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(wrong)?;
    let values = b
        .column(2)
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(wrong)?;
    let keys = types.keys().values();
    let mut start = 0;
    while start < keys.len() {
        let key = keys[start];
        let end = keys[start..]
            .iter()
            .position(|k| *k != key)
            .map_or(keys.len(), |n| start + n);
        let name = usize::try_from(key)
            .ok()
            .filter(|k| *k < names.len())
            .map(|k| names.value(k))
            .ok_or_else(wrong)?;
        let list = match totals.get_mut(name) {
            Some(l) => l,
            None => totals.entry(name.to_string()).or_default(),
        };
        let pairs = ids.values()[start..end]
            .iter()
            .zip(&values.values()[start..end]);
        list.extend(pairs.map(|(id, v)| (*id, *v)));
        start = end;
    }
    Ok(())
}
