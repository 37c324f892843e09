//! Time series of profile totals: what Pyroscope's `SelectSeries` answers
//! and Grafana graphs. Each profile contributes its total (stored per
//! profile in the `profiles` section, so no sample is read), at the end of
//! the step it falls in, summed or averaged per group of `group_by` labels.
//!
//! One engine for both front ends: [`QueryEngine::select_series`] (the
//! Pyroscope API) and the SQL table function
//! `series(profile_type, selector, start, end, step [, group_by])`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Builder, RecordBatch, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::provider_as_source;
use datafusion::error::Result;
use datafusion::logical_expr::{col, Expr, LogicalPlanBuilder, TableType};
use datafusion::physical_plan::{execute_stream, ExecutionPlan};
use ember_engine::block::Section;
use ember_engine::profile::labels_to_string;
use ember_engine::selector::{parse_series, Selector};
use ember_engine::Labels;
use ember_metastore::MetastoreIndex;
use futures::TryStreamExt;
use object_store::ObjectStore;

use crate::args;
use crate::selection::ProfileSelection;
use crate::settings::Settings;
use crate::storage::index_answer;
use crate::tables::{DatasetSource, SectionTable};

pub(crate) const NAME: &str = "series";

/// Most points one series may have: Prometheus' limit per query, which
/// keeps a tiny step over a long range from costing unbounded memory.
pub const MAX_POINTS: i64 = 11_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    #[default]
    Sum,
    Average,
}

#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub selection: ProfileSelection,
    pub step_nanos: i64,
    /// Labels the series are grouped by; none sums everything into one.
    pub group_by: Vec<String>,
    pub aggregation: Aggregation,
    /// Keep the top `limit` series by their total.
    pub limit: Option<usize>,
}

impl SeriesQuery {
    /// Refuses a step that is not positive or that makes too many points.
    pub fn check(&self) -> std::result::Result<(), String> {
        let s = &self.selection;
        if self.step_nanos <= 0 {
            return Err(format!("step must be positive, got {} ns", self.step_nanos));
        }
        if s.end < s.start {
            return Err("end is before start".into());
        }
        let points = (i128::from(s.end) - i128::from(s.start)) / i128::from(self.step_nanos) + 1;
        if points > i128::from(MAX_POINTS) {
            return Err(format!(
                "{points} points per series (range / step) is over {MAX_POINTS}: widen the step"
            ));
        }
        Ok(())
    }

    /// The time of the point a profile at `t` counts in: the end of its
    /// step, as Pyroscope lays steps from `start`.
    fn point_time(&self, t: i64) -> i64 {
        let start = i128::from(self.selection.start);
        let step = i128::from(self.step_nanos);
        let steps = (i128::from(t) - start + step - 1).div_euclid(step);
        (start + steps * step) as i64
    }
}

/// One series: its group's labels and its points, in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeSeries {
    pub labels: Labels,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Milliseconds since the epoch.
    pub time_ms: i64,
    pub value: f64,
}

/// Reads the matching profiles rows and folds them into series.
pub(crate) async fn series_of(
    state: &dyn Session,
    index: &dyn MetastoreIndex,
    store: Arc<dyn ObjectStore>,
    q: &SeriesQuery,
) -> Result<Vec<TimeSeries>> {
    let datasets = q
        .selection
        .datasets(index, Settings::of(state).skip_level0)
        .await?;
    if datasets.is_empty() {
        return Ok(Vec::new());
    }
    let filter = q.selection.row_filter(&datasets);
    let table = SectionTable::new(
        Section::Profiles,
        store,
        DatasetSource::Fixed(Arc::new(datasets)),
    );
    let mut plan = LogicalPlanBuilder::scan("profiles", provider_as_source(Arc::new(table)), None)?;
    if let Some(filter) = filter {
        plan = plan.filter(filter)?;
    }
    let plan = plan
        .project(vec![col("time"), col("labels"), col("total")])?
        .build()?;
    let physical = state.create_physical_plan(&plan).await?;
    let mut stream = execute_stream(physical, state.task_ctx())?;
    let mut folder = SeriesFolder::new(q);
    while let Some(batch) = stream.try_next().await? {
        folder.add(&batch)?;
    }
    Ok(folder.finish())
}

/// Sums (and counts) profile totals per group and point time.
struct SeriesFolder<'a> {
    q: &'a SeriesQuery,
    /// A series' labels text to its group, parsed once per series.
    groups_of: HashMap<String, Labels>,
    sums: BTreeMap<Labels, BTreeMap<i64, (f64, u64)>>,
}

impl<'a> SeriesFolder<'a> {
    fn new(q: &'a SeriesQuery) -> Self {
        Self {
            q,
            groups_of: HashMap::new(),
            sums: BTreeMap::new(),
        }
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let time = timestamps_nanos(batch.column(0))?;
        let labels = batch.column(1).as_string::<i32>();
        let totals = batch.column(2).as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            if time.is_null(i) || labels.is_null(i) || totals.is_null(i) {
                continue;
            }
            let series = labels.value(i);
            if !self.groups_of.contains_key(series) {
                let group = group_labels(series, &self.q.group_by);
                self.groups_of.insert(series.to_string(), group);
            }
            let group = &self.groups_of[series];
            let at = self.q.point_time(time.value(i)) / 1_000_000;
            let point = self
                .sums
                .entry(group.clone())
                .or_default()
                .entry(at)
                .or_insert((0.0, 0));
            point.0 += totals.value(i) as f64;
            point.1 += 1;
        }
        Ok(())
    }

    fn finish(self) -> Vec<TimeSeries> {
        let average = self.q.aggregation == Aggregation::Average;
        let mut series: Vec<TimeSeries> = self
            .sums
            .into_iter()
            .map(|(labels, points)| TimeSeries {
                labels,
                points: points
                    .into_iter()
                    .map(|(time_ms, (sum, n))| Point {
                        time_ms,
                        value: if average { sum / n as f64 } else { sum },
                    })
                    .collect(),
            })
            .collect();
        if let Some(limit) = self.q.limit {
            if series.len() > limit {
                let total = |s: &TimeSeries| s.points.iter().map(|p| p.value).sum::<f64>();
                series.sort_by(|a, b| total(b).total_cmp(&total(a)));
                series.truncate(limit);
                series.sort_by(|a, b| a.labels.cmp(&b.labels));
            }
        }
        series
    }
}

fn timestamps_nanos(a: &ArrayRef) -> Result<&datafusion::arrow::array::TimestampNanosecondArray> {
    a.as_any()
        .downcast_ref()
        .ok_or_else(|| DataFusionError::Internal(format!("{NAME}: time is {}", a.data_type())))
}

/// The series' labels restricted to `group_by`, in `group_by`'s order.
fn group_labels(series: &str, group_by: &[String]) -> Labels {
    if group_by.is_empty() {
        return Labels::new();
    }
    let labels = parse_series(series).unwrap_or_default();
    group_by
        .iter()
        .filter_map(|name| {
            labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(n, v)| (n.clone(), v.clone()))
        })
        .collect()
}

/// A step: seconds as a number or a string, or an interval (Grafana's
/// `$__interval` expands to `interval '15 second'`).
fn step_arg(v: &ScalarValue) -> Result<i64> {
    let seconds = |s: f64| -> Result<i64> {
        if s.is_finite() && s > 0.0 && s < 1e10 {
            Ok((s * 1e9).round() as i64)
        } else {
            plan_err!("{NAME}: step must be a positive number of seconds, got {s}")
        }
    };
    match v {
        ScalarValue::Int64(Some(n)) => seconds(*n as f64),
        ScalarValue::Int32(Some(n)) => seconds(f64::from(*n)),
        ScalarValue::UInt64(Some(n)) => seconds(*n as f64),
        ScalarValue::Float64(Some(f)) => seconds(*f),
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => match s.trim().parse() {
            Ok(f) => seconds(f),
            Err(_) => plan_err!("{NAME}: step {s:?} is not a number of seconds"),
        },
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
            let nanos = i128::from(i.days) * 86_400_000_000_000 + i128::from(i.nanoseconds);
            match i64::try_from(nanos) {
                Ok(n) if n > 0 => Ok(n),
                _ => plan_err!("{NAME}: step must be a positive interval"),
            }
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            let nanos = (i64::from(i.days) * 86_400_000 + i64::from(i.milliseconds)) * 1_000_000;
            if nanos > 0 {
                Ok(nanos)
            } else {
                plan_err!("{NAME}: step must be a positive interval")
            }
        }
        other => {
            plan_err!("{NAME}: step must be seconds or an interval without months, got {other:?}")
        }
    }
}

/// `series(...)` bound to the session's tenant.
pub struct SeriesFunction {
    store: Arc<dyn ObjectStore>,
    index: Arc<dyn MetastoreIndex>,
    tenant: String,
}

impl fmt::Debug for SeriesFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SeriesFunction({})", self.tenant)
    }
}

impl SeriesFunction {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        index: Arc<dyn MetastoreIndex>,
        tenant: String,
    ) -> Self {
        Self {
            store,
            index,
            tenant,
        }
    }
}

impl TableFunctionImpl for SeriesFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let values = args::literals(NAME, args.exprs(), args.session())?;
        if !(5..=6).contains(&values.len()) {
            return plan_err!(
                "{NAME}(profile_type, selector, start, end, step [, group_by]) takes 5 or 6 arguments, got {}",
                values.len()
            );
        }
        let selector_text = args::string_arg(NAME, "selector", &values[1])?;
        let group_by = match values.get(5) {
            Some(v) => args::string_arg(NAME, "group_by", v)?
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => Vec::new(),
        };
        let query = SeriesQuery {
            selection: ProfileSelection {
                tenant: self.tenant.clone(),
                profile_type: args::string_arg(NAME, "profile_type", &values[0])?,
                selector: Selector::parse(&selector_text)
                    .map_err(|e| DataFusionError::Plan(format!("{NAME}: {e}")))?,
                start: args::time_arg(NAME, "start", &values[2])?,
                end: args::time_arg(NAME, "end", &values[3])?,
            },
            step_nanos: step_arg(&values[4])?,
            group_by,
            aggregation: Aggregation::Sum,
            limit: None,
        };
        query
            .check()
            .map_err(|e| DataFusionError::Plan(format!("{NAME}: {e}")))?;
        let schema = wide_schema(&self.group_names(&query, args.session())?);
        Ok(Arc::new(SeriesTable {
            store: self.store.clone(),
            index: self.index.clone(),
            query,
            schema,
        }))
    }
}

impl SeriesFunction {
    /// The groups the index knows for the query: the frame's columns, known
    /// before any section is read.
    fn group_names(&self, q: &SeriesQuery, session: &dyn Session) -> Result<Vec<String>> {
        let skip_level0 = Settings::of(session).skip_level0;
        let datasets = index_answer(q.selection.datasets(self.index.as_ref(), skip_level0))?;
        let groups: BTreeSet<Labels> = datasets
            .iter()
            .flat_map(|d| d.dataset.series.clone())
            .filter(|s| q.selection.selector.matches_series(s))
            .map(|s| group_labels(&s, &q.group_by))
            .collect();
        Ok(groups.iter().map(column_name).collect())
    }
}

/// A group's column: its labels as Pyroscope prints them, `value` for the
/// one group of an ungrouped query.
fn column_name(labels: &Labels) -> String {
    if labels.is_empty() {
        "value".to_string()
    } else {
        labels_to_string(labels)
    }
}

/// `time` first, then one Float64 column per group: the wide frame Grafana
/// graphs as one line per column.
fn wide_schema(groups: &[String]) -> SchemaRef {
    let mut fields = vec![Field::new(
        "time",
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    )];
    fields.extend(
        groups
            .iter()
            .map(|g| Field::new(g, DataType::Float64, true)),
    );
    Arc::new(Schema::new(fields))
}

struct SeriesTable {
    store: Arc<dyn ObjectStore>,
    index: Arc<dyn MetastoreIndex>,
    query: SeriesQuery,
    schema: SchemaRef,
}

impl fmt::Debug for SeriesTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SeriesTable({:?})", self.query)
    }
}

#[async_trait]
impl TableProvider for SeriesTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
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
        let series = series_of(state, self.index.as_ref(), self.store.clone(), &self.query).await?;
        let batch = wide_frame(&self.schema, &series)?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// One row per point time of any series; a column per group of the schema
/// (null where that group has no point).
fn wide_frame(schema: &SchemaRef, series: &[TimeSeries]) -> Result<RecordBatch> {
    let times: BTreeSet<i64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.time_ms))
        .collect();
    let row_of: HashMap<i64, usize> = times.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let by_name: HashMap<String, &TimeSeries> =
        series.iter().map(|s| (column_name(&s.labels), s)).collect();
    let mut columns: Vec<ArrayRef> = vec![Arc::new(
        TimestampMillisecondArray::from(times.iter().copied().collect::<Vec<_>>())
            .with_timezone("UTC"),
    )];
    for field in schema.fields().iter().skip(1) {
        let mut values = vec![None; times.len()];
        if let Some(s) = by_name.get(field.name()) {
            for p in &s.points {
                values[row_of[&p.time_ms]] = Some(p.value);
            }
        }
        let mut b = Float64Builder::with_capacity(values.len());
        b.extend(values);
        columns.push(Arc::new(b.finish()));
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(start: i64, end: i64, step: i64) -> SeriesQuery {
        SeriesQuery {
            selection: ProfileSelection {
                tenant: "t".into(),
                profile_type: "a:b:c:d:e".into(),
                selector: Selector::parse("{}").unwrap(),
                start,
                end,
            },
            step_nanos: step,
            group_by: vec!["pod".into()],
            aggregation: Aggregation::Sum,
            limit: None,
        }
    }

    #[test]
    fn a_profile_counts_at_the_end_of_its_step() {
        let q = query(1_000, 100_000, 10);
        assert_eq!(q.point_time(1_000), 1_000);
        assert_eq!(q.point_time(1_001), 1_010);
        assert_eq!(q.point_time(1_010), 1_010);
        assert_eq!(q.point_time(1_011), 1_020);
    }

    #[test]
    fn steps_that_make_too_many_points_are_refused() {
        assert!(query(0, 10, 0).check().is_err());
        assert!(query(0, 10, -5).check().is_err());
        assert!(query(10, 0, 1).check().is_err());
        let e = query(0, MAX_POINTS * 10, 1).check().unwrap_err();
        assert!(e.contains("widen the step"), "{e}");
        assert!(query(0, (MAX_POINTS - 1) * 10, 10).check().is_ok());
    }

    #[test]
    fn groups_keep_only_the_named_labels() {
        let s = r#"{env="prod", pod="a", service_name="api"}"#;
        assert_eq!(
            group_labels(s, &["pod".into(), "zone".into()]),
            vec![("pod".to_string(), "a".to_string())]
        );
        assert!(group_labels(s, &[]).is_empty());
    }

    #[test]
    fn steps_read_seconds_and_intervals() {
        use datafusion::arrow::datatypes::IntervalMonthDayNano;
        assert_eq!(
            step_arg(&ScalarValue::Int64(Some(15))).unwrap(),
            15_000_000_000
        );
        assert_eq!(
            step_arg(&ScalarValue::Float64(Some(0.5))).unwrap(),
            500_000_000
        );
        assert_eq!(
            step_arg(&ScalarValue::Utf8(Some("10".into()))).unwrap(),
            10_000_000_000
        );
        let i = IntervalMonthDayNano::new(0, 0, 30_000_000_000);
        assert_eq!(
            step_arg(&ScalarValue::IntervalMonthDayNano(Some(i))).unwrap(),
            30_000_000_000
        );
        assert!(step_arg(&ScalarValue::Int64(Some(0))).is_err());
        assert!(step_arg(&ScalarValue::Float64(Some(f64::NAN))).is_err());
        let month = IntervalMonthDayNano::new(1, 0, 0);
        assert!(step_arg(&ScalarValue::IntervalMonthDayNano(Some(month))).is_err());
    }

    #[test]
    fn average_divides_each_point_and_limit_keeps_the_largest() {
        let mut q = query(0, 100, 10);
        q.aggregation = Aggregation::Average;
        q.limit = Some(1);
        let mut f = SeriesFolder::new(&q);
        let key = |pod: &str| vec![("pod".to_string(), pod.to_string())];
        f.sums.insert(key("a"), BTreeMap::from([(0, (30.0, 3))]));
        f.sums.insert(key("b"), BTreeMap::from([(0, (50.0, 2))]));
        let out = f.finish();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].labels, key("b"));
        assert_eq!(
            out[0].points,
            vec![Point {
                time_ms: 0,
                value: 25.0
            }]
        );
    }
}
