//! Profile types, label names, label values and series of a tenant in a time
//! range, answered from the metastore's index and the datasets' series
//! lists: no section is read.
//!
//! A series is reported once per profile type of its dataset, with the
//! labels Pyroscope derives from the type (`__profile_type__`, `__type__`,
//! `__unit__`, `__period_type__`, `__period_unit__`, and `__name__` when the
//! push had none), so that selectors on them work as they do in Pyroscope.
//! The index keeps types per dataset, not per series: a dataset whose series
//! push different types reports each series under each of them.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError};
use datafusion::datasource::MemTable;
use datafusion::error::Result;

use ember_engine::profile::{normalise_labels, Labels, METRIC_NAME, PROFILE_TYPE};
use ember_engine::selector::{parse_series, Selector};
use ember_metastore::BlockQuery;

use ember_metastore::MetastoreIndex;

use crate::args;
use crate::storage::{index_answer, index_error};

/// The series a label query looks at.
#[derive(Debug, Clone, Default)]
pub struct LabelQuery {
    pub tenant: String,
    /// A series matches if any selector matches it (Pyroscope's `matchers`
    /// are alternatives); no selector matches every series.
    pub selectors: Vec<Selector>,
    /// Nanoseconds since the epoch, inclusive.
    pub start: i64,
    pub end: i64,
}

/// One series under one of its dataset's profile types: its own labels and
/// those Pyroscope derives from the type, read without building the set
/// (a label call over 100 k series would otherwise allocate a million
/// strings to answer with a few).
struct Typed<'a> {
    labels: &'a Labels,
    profile_type: &'a str,
    /// `name:sample_type:sample_unit:period_type:period_unit`.
    parts: Option<[&'a str; 5]>,
}

/// The labels derived from a profile type's parts 1 to 4.
const DERIVED: [&str; 4] = ["__type__", "__unit__", "__period_type__", "__period_unit__"];

impl<'a> Typed<'a> {
    fn new(labels: &'a Labels, profile_type: &'a str) -> Self {
        let parts: Vec<&str> = profile_type.split(':').collect();
        Typed {
            labels,
            profile_type,
            parts: parts.try_into().ok(),
        }
    }

    /// A label's value, as `with_profile_type` would set it: the type's
    /// labels win over the series' own, except `__name__`.
    fn get(&self, name: &str) -> Option<&'a str> {
        if name == PROFILE_TYPE {
            return Some(self.profile_type);
        }
        if let Some(parts) = self.parts {
            if let Some(i) = DERIVED.iter().position(|d| *d == name) {
                return Some(parts[i + 1]);
            }
            if name == METRIC_NAME {
                return self.own(name).or(Some(parts[0]));
            }
        }
        self.own(name)
    }

    fn own(&self, name: &str) -> Option<&'a str> {
        self.labels
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn matches(&self, selectors: &[Selector]) -> bool {
        selectors.is_empty()
            || selectors
                .iter()
                .any(|s| s.matchers.iter().all(|m| m.matches(self.get(&m.name))))
    }

    fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        let derived: &[&str] = if self.parts.is_some() {
            &[METRIC_NAME, DERIVED[0], DERIVED[1], DERIVED[2], DERIVED[3]]
        } else {
            &[]
        };
        self.labels
            .iter()
            .map(|(k, _)| k.as_str())
            .chain([PROFILE_TYPE])
            .chain(derived.iter().copied())
    }
}

/// Calls `f` with each series of the range under each profile type of its
/// dataset that the query's selectors match.
async fn each_matching(
    index: &dyn MetastoreIndex,
    q: &LabelQuery,
    mut f: impl FnMut(&Typed),
) -> Result<()> {
    let datasets = index
        .datasets(&BlockQuery {
            tenant: q.tenant.clone(),
            start: q.start,
            end: q.end,
            ..BlockQuery::default()
        })
        .await
        .map_err(index_error)?;
    for d in &datasets {
        for series in &d.dataset.series {
            let Some(labels) = parse_series(series) else {
                continue;
            };
            for ty in &d.dataset.profile_types {
                let typed = Typed::new(&labels, ty);
                if typed.matches(&q.selectors) {
                    f(&typed);
                }
            }
        }
    }
    Ok(())
}

pub(crate) async fn series_labels(
    index: &dyn MetastoreIndex,
    q: &LabelQuery,
) -> Result<Vec<Labels>> {
    let mut out: BTreeSet<Labels> = BTreeSet::new();
    each_matching(index, q, |t| {
        out.insert(with_profile_type(t.labels.clone(), t.profile_type));
    })
    .await?;
    Ok(out.into_iter().collect())
}

pub(crate) async fn label_names(index: &dyn MetastoreIndex, q: &LabelQuery) -> Result<Vec<String>> {
    let mut names: BTreeSet<String> = BTreeSet::new();
    each_matching(index, q, |t| {
        for name in t.names() {
            if !names.contains(name) {
                names.insert(name.to_string());
            }
        }
    })
    .await?;
    Ok(names.into_iter().collect())
}

pub(crate) async fn label_values(
    index: &dyn MetastoreIndex,
    name: &str,
    q: &LabelQuery,
) -> Result<Vec<String>> {
    let mut values: BTreeSet<String> = BTreeSet::new();
    each_matching(index, q, |t| {
        if let Some(v) = t.get(name) {
            if !values.contains(v) {
                values.insert(v.to_string());
            }
        }
    })
    .await?;
    Ok(values.into_iter().collect())
}

/// `label_names(selector, start, end)` and `label_values(name, selector,
/// start, end)` in SQL: one column (`name` or `value`) answered from the
/// index, as the query API's LabelNames and LabelValues are.
pub struct LabelFunction {
    index: Arc<dyn MetastoreIndex>,
    tenant: String,
    of_values: bool,
}

impl fmt::Debug for LabelFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LabelFunction({}, values: {})",
            self.tenant, self.of_values
        )
    }
}

impl LabelFunction {
    pub(crate) fn names(index: Arc<dyn MetastoreIndex>, tenant: String) -> Self {
        Self {
            index,
            tenant,
            of_values: false,
        }
    }

    pub(crate) fn values(index: Arc<dyn MetastoreIndex>, tenant: String) -> Self {
        Self {
            index,
            tenant,
            of_values: true,
        }
    }
}

impl TableFunctionImpl for LabelFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let (function, column, skip) = if self.of_values {
            ("label_values", "value", 1)
        } else {
            ("label_names", "name", 0)
        };
        let values = args::literals(function, args.exprs(), args.session())?;
        if values.len() != skip + 3 {
            let signature = if self.of_values {
                "label_values(name, selector, start, end)"
            } else {
                "label_names(selector, start, end)"
            };
            return plan_err!(
                "{signature} takes {} arguments, got {}",
                skip + 3,
                values.len()
            );
        }
        let selector = args::string_arg(function, "selector", &values[skip])?;
        let q = LabelQuery {
            tenant: self.tenant.clone(),
            selectors: vec![Selector::parse(&selector)
                .map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?],
            start: args::time_arg(function, "start", &values[skip + 1])?,
            end: args::time_arg(function, "end", &values[skip + 2])?,
        };
        let list = if self.of_values {
            let name = args::string_arg(function, "name", &values[0])?;
            index_answer(label_values(self.index.as_ref(), &name, &q))?
        } else {
            index_answer(label_names(self.index.as_ref(), &q))?
        };
        let schema = Arc::new(Schema::new(vec![Field::new(column, DataType::Utf8, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(list))])?;
        Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
    }
}

/// `labels` with the labels Pyroscope derives from a profile type ID
/// (`name:sample_type:sample_unit:period_type:period_unit`).
fn with_profile_type(mut labels: Labels, profile_type: &str) -> Labels {
    labels.push((PROFILE_TYPE.to_string(), profile_type.to_string()));
    let parts: Vec<&str> = profile_type.split(':').collect();
    if let [name, sample_type, sample_unit, period_type, period_unit] = parts[..] {
        if !labels.iter().any(|(n, _)| n == METRIC_NAME) {
            labels.push((METRIC_NAME.to_string(), name.to_string()));
        }
        for (n, v) in [
            ("__type__", sample_type),
            ("__unit__", sample_unit),
            ("__period_type__", period_type),
            ("__period_unit__", period_unit),
        ] {
            labels.push((n.to_string(), v.to_string()));
        }
    }
    normalise_labels(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_type_adds_the_labels_pyroscope_derives_from_it() {
        let labels = with_profile_type(
            vec![("service_name".into(), "api".into())],
            "process_cpu:cpu:nanoseconds:cpu:nanoseconds",
        );
        let get = |n: &str| labels.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            get("__profile_type__"),
            Some("process_cpu:cpu:nanoseconds:cpu:nanoseconds")
        );
        assert_eq!(get("__name__"), Some("process_cpu"));
        assert_eq!(get("__type__"), Some("cpu"));
        assert_eq!(get("__period_unit__"), Some("nanoseconds"));
        assert_eq!(get("service_name"), Some("api"));
        let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "labels stay sorted by name");
    }

    /// The lookups label calls make answer what the built label set says,
    /// for names, values and selectors, own labels and derived ones.
    #[test]
    fn typed_lookups_agree_with_the_built_label_set() {
        let series: Vec<Labels> = vec![
            vec![
                ("service_name".into(), "api".into()),
                ("pod".into(), "p1".into()),
            ],
            vec![
                ("__name__".into(), "custom".into()),
                ("service_name".into(), "web".into()),
            ],
            vec![("__type__".into(), "mine".into()), ("a".into(), "".into())],
        ];
        let types = [
            "process_cpu:cpu:nanoseconds:cpu:nanoseconds",
            "off_cpu:off_cpu:nanoseconds::",
            "odd",
        ];
        let selectors: Vec<Selector> = [
            "{}",
            r#"{service_name="api"}"#,
            r#"{__name__="process_cpu"}"#,
            r#"{__name__="custom", __period_type__=""}"#,
            r#"{__type__=~"c.*", pod!="p2"}"#,
            r#"{__profile_type__="odd"}"#,
            r#"{missing=""}"#,
        ]
        .iter()
        .map(|s| Selector::parse(s).unwrap())
        .collect();
        for labels in &series {
            for ty in types {
                let built = with_profile_type(labels.clone(), ty);
                let typed = Typed::new(labels, ty);
                let mut names: Vec<&str> = typed.names().collect();
                names.sort();
                names.dedup();
                let built_names: Vec<&str> = built.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(names, built_names, "{labels:?} {ty}");
                for (k, v) in &built {
                    assert_eq!(typed.get(k), Some(v.as_str()), "{k} of {labels:?} {ty}");
                }
                assert_eq!(typed.get("missing"), None);
                for s in &selectors {
                    let one = std::slice::from_ref(s);
                    assert_eq!(typed.matches(one), s.matches(&built), "{s:?} on {built:?}");
                }
            }
        }
    }
}
