//! Turning a keyed samples section's rows (see
//! [`super::keyed_samples_schema`]) back into the strings of
//! [`super::samples_schema`].

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, RecordBatch, StringArray};
use arrow::compute::{take, TakeOptions};
use arrow::datatypes::Int32Type;
use arrow::error::ArrowError;

use super::meta::DatasetMeta;
use super::schema::{keyed_source, samples_schema};

/// A dataset's service, profile types and series, which the keys of its
/// keyed samples section point into.
#[derive(Debug)]
pub struct DatasetStrings {
    service: ArrayRef,
    profile_types: ArrayRef,
    series: ArrayRef,
}

impl DatasetStrings {
    pub fn of(dataset: &DatasetMeta) -> Self {
        let strings = |values: &[String]| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(values.iter()))
        };
        DatasetStrings {
            service: Arc::new(StringArray::from_iter_values([&dataset.service_name])),
            profile_types: strings(&dataset.profile_types),
            series: strings(&dataset.series),
        }
    }

    /// The [`samples_schema`] column `name` of the keyed rows `keyed`. A
    /// key outside its list (a corrupt section) is an error.
    pub fn column(&self, name: &str, keyed: &RecordBatch) -> Result<ArrayRef, ArrowError> {
        let source = |name: &str| {
            keyed.column_by_name(name).ok_or_else(|| {
                ArrowError::SchemaError(format!("keyed samples without column {name}"))
            })
        };
        let values = match name {
            "service_name" => &self.service,
            "profile_type" => &self.profile_types,
            "labels" => &self.series,
            other => return Ok(source(other)?.clone()),
        };
        let keys = match keyed_source(name) {
            Some(column) => {
                let keys = source(column)?;
                keys.as_primitive_opt::<Int32Type>()
                    .ok_or_else(|| {
                        ArrowError::SchemaError(format!("{column} of type {}", keys.data_type()))
                    })?
                    .clone()
            }
            None => Int32Array::from(vec![0; keyed.num_rows()]),
        };
        let options = TakeOptions { check_bounds: true };
        take(values.as_ref(), &keys, Some(options)).map_err(|e| {
            ArrowError::InvalidArgumentError(format!(
                "{name} keys outside the dataset's {} values: {e}",
                values.len()
            ))
        })
    }

    /// The keyed rows as [`samples_schema`] rows.
    pub fn samples(&self, keyed: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        let schema = samples_schema();
        let columns = schema
            .fields()
            .iter()
            .map(|f| self.column(f.name(), keyed))
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(schema, columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::keyed_samples_schema;
    use arrow::array::{Int64Array, TimestampNanosecondArray, UInt64Array};

    fn keyed(types: Vec<i32>, series: Vec<i32>) -> RecordBatch {
        let n = types.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampNanosecondArray::from(vec![7; n]).with_timezone("UTC")),
            Arc::new(Int32Array::from(types)),
            Arc::new(Int32Array::from(series)),
            Arc::new(UInt64Array::from(vec![1; n])),
            Arc::new(Int64Array::from(vec![2; n])),
            Arc::new(UInt64Array::from(vec![None; n])),
        ];
        RecordBatch::try_new(keyed_samples_schema(), columns).unwrap()
    }

    fn dataset() -> DatasetMeta {
        DatasetMeta {
            service_name: "api".into(),
            profile_types: vec!["a:a:a:a:a".into(), "b:b:b:b:b".into()],
            series: vec!["{pod=\"1\"}".into(), "{pod=\"2\"}".into()],
            ..Default::default()
        }
    }

    #[test]
    fn keys_become_their_strings() {
        let strings = DatasetStrings::of(&dataset());
        let rows = strings
            .samples(&keyed(vec![1, 0, 0], vec![0, 1, 0]))
            .unwrap();
        let column = |name| {
            rows.column_by_name(name)
                .unwrap()
                .as_string::<i32>()
                .clone()
        };
        let (service, ty, labels) = (
            column("service_name"),
            column("profile_type"),
            column("labels"),
        );
        let got: Vec<(&str, &str, &str)> = (0..rows.num_rows())
            .map(|i| (service.value(i), ty.value(i), labels.value(i)))
            .collect();
        assert_eq!(
            got,
            [
                ("api", "b:b:b:b:b", "{pod=\"1\"}"),
                ("api", "a:a:a:a:a", "{pod=\"2\"}"),
                ("api", "a:a:a:a:a", "{pod=\"1\"}"),
            ]
        );
        assert_eq!(rows.schema(), samples_schema());
    }

    #[test]
    fn a_key_past_its_list_is_an_error_not_a_panic() {
        let strings = DatasetStrings::of(&dataset());
        for batch in [keyed(vec![2], vec![0]), keyed(vec![0], vec![-1])] {
            let err = strings.samples(&batch).unwrap_err().to_string();
            assert!(err.contains("keys outside the dataset's 2 values"), "{err}");
        }
    }
}
