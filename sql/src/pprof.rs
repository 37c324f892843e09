//! A merged pprof profile: what Pyroscope's `SelectMergeProfile` returns and
//! `go tool pprof` reads. It is the flame graph laid out as samples (one per
//! node with self value, its path from the root as locations, leaf first),
//! so it merges, truncates (`max_nodes`, into `other`) and totals exactly as
//! the flame graph does, at the flame graph's cost.
//!
//! SQL: `pprof(profile_type, selector, start, end [, max_nodes])` returns
//! one row with the profile's protobuf encoding (`profile`, Binary).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{BinaryArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::{collect, ExecutionPlan};
use ember_api::google::v1::{Function, Line, Location, Profile, Sample, ValueType};
use prost::Message;

use crate::flamegraph::{for_each_frame_row, FlameGraphQuery, FlameGraphTable};
use crate::storage::Storage;

const NAME: &str = "pprof";

/// The one column `pprof()` returns.
pub fn pprof_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![Field::new(
            "profile",
            DataType::Binary,
            false,
        )]))
    })
    .clone()
}

/// Strings interned into a profile's string table (index 0 is "").
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        Self {
            table: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// The profile of a flame graph frame (`level`, `value`, `self`, `label`,
/// depth first from the root at level 0) of `profile_type`
/// (`name:sample_type:sample_unit:period_type:period_unit`), covering
/// `[start, end]` nanoseconds.
pub fn profile_of_flame_graph(
    batches: &[RecordBatch],
    profile_type: &str,
    start: i64,
    end: i64,
) -> std::result::Result<Profile, String> {
    let parts: Vec<&str> = profile_type.split(':').collect();
    let part = |i: usize| parts.get(i).copied().unwrap_or_default();
    let mut strings = Strings::new();
    let mut profile = Profile {
        sample_type: vec![ValueType {
            r#type: strings.id(part(1)),
            unit: strings.id(part(2)),
        }],
        period_type: Some(ValueType {
            r#type: strings.id(part(3)),
            unit: strings.id(part(4)),
        }),
        time_nanos: start.max(0),
        duration_nanos: if start > 0 && end < i64::MAX / 2 {
            end.saturating_sub(start)
        } else {
            0
        },
        ..Profile::default()
    };
    // One function and one location per distinct frame name.
    let mut location_of: HashMap<String, u64> = HashMap::new();
    let mut path: Vec<u64> = Vec::new();
    for_each_frame_row(batches, |row| {
        if row.depth > 0 {
            path.truncate(row.depth - 1);
            let next_id = location_of.len() as u64 + 1;
            let id = *location_of.entry(row.label.to_string()).or_insert(next_id);
            if id == next_id {
                let function_name = strings.id(row.label);
                profile.function.push(Function {
                    id,
                    name: function_name,
                    system_name: function_name,
                    ..Function::default()
                });
                profile.location.push(Location {
                    id,
                    line: vec![Line {
                        function_id: id,
                        ..Line::default()
                    }],
                    ..Location::default()
                });
            }
            path.push(id);
        }
        if row.own != 0 {
            profile.sample.push(Sample {
                location_id: path.iter().rev().copied().collect(),
                value: vec![row.own],
                label: Vec::new(),
            });
        }
        Ok(())
    })?;
    profile.string_table = strings.table;
    Ok(profile)
}

/// The flame graph of `table` as an encoded pprof profile.
pub(crate) async fn profile_bytes(table: &FlameGraphTable, state: &dyn Session) -> Result<Vec<u8>> {
    let tree = table.scan(state, None, &[], None).await?;
    let frame = collect(tree, state.task_ctx()).await?;
    let s = &table.query.selection;
    let profile = profile_of_flame_graph(&frame, &s.profile_type, s.start, s.end)
        .map_err(|e| DataFusionError::Internal(format!("{NAME}: {e}")))?;
    Ok(profile.encode_to_vec())
}

/// `pprof(...)` bound to the session's tenant.
pub struct PprofFunction {
    storage: Storage,
    tenant: String,
}

impl fmt::Debug for PprofFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PprofFunction({})", self.tenant)
    }
}

impl PprofFunction {
    pub(crate) fn new(storage: Storage, tenant: String) -> Self {
        Self { storage, tenant }
    }
}

impl TableFunctionImpl for PprofFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        Ok(Arc::new(PprofTable {
            flame_graph: FlameGraphTable {
                storage: self.storage.clone(),
                query: FlameGraphQuery::from_args(NAME, &args, &self.tenant)?,
            },
        }))
    }
}

struct PprofTable {
    flame_graph: FlameGraphTable,
}

impl fmt::Debug for PprofTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PprofTable({:?})", self.flame_graph.query)
    }
}

#[async_trait]
impl TableProvider for PprofTable {
    fn schema(&self) -> SchemaRef {
        pprof_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let profile = profile_bytes(&self.flame_graph, state).await?;
        let bytes = BinaryArray::from_vec(vec![profile.as_slice()]);
        let batch = RecordBatch::try_new(pprof_schema(), vec![Arc::new(bytes)])?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            pprof_schema(),
            projection.cloned(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::flamegraph::frame_of as frame;

    /// `a;b;c` -> value, read back from the profile.
    fn stacks(p: &Profile) -> Vec<(String, i64)> {
        let name = |id: u64| {
            let f = p.function.iter().find(|f| f.id == id).unwrap();
            p.string_table[f.name as usize].clone()
        };
        let mut out: Vec<(String, i64)> = p
            .sample
            .iter()
            .map(|s| {
                let frames: Vec<String> = s.location_id.iter().rev().map(|id| name(*id)).collect();
                (frames.join(";"), s.value[0])
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_node_with_self_value_is_a_sample_with_its_path() {
        let f = frame(&[
            (0, 10, 0, "total"),
            (1, 10, 1, "main"),
            (2, 6, 6, "work"),
            (2, 3, 1, "io"),
            (3, 2, 2, "work"),
        ]);
        let p = profile_of_flame_graph(&[f], "process_cpu:cpu:nanoseconds:cpu:nanoseconds", 5, 15)
            .unwrap();
        assert_eq!(
            stacks(&p),
            vec![
                ("main".to_string(), 1),
                ("main;io".to_string(), 1),
                ("main;io;work".to_string(), 2),
                ("main;work".to_string(), 6),
            ]
        );
        // `work` is one function and one location wherever it appears.
        assert_eq!(p.function.len(), 3);
        assert_eq!(p.location.len(), 3);
        let st = &p.sample_type[0];
        assert_eq!(p.string_table[st.r#type as usize], "cpu");
        assert_eq!(p.string_table[st.unit as usize], "nanoseconds");
        assert_eq!((p.time_nanos, p.duration_nanos), (5, 10));
        let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn a_frame_out_of_order_is_an_error() {
        let f = frame(&[(0, 1, 0, "total"), (2, 1, 1, "x")]);
        assert!(profile_of_flame_graph(&[f], "a:b:c:d:e", 0, 1).is_err());
        let f = frame(&[(1, 1, 1, "x")]);
        assert!(profile_of_flame_graph(&[f], "a:b:c:d:e", 0, 1).is_err());
    }
}
