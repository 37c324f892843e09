//! Query results as a terminal prints them: a table, CSV or JSON lines.

use std::io::Write;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// How `ember query` prints its result.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum OutputFormat {
    /// An aligned table.
    #[default]
    Table,
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per row, one row per line.
    Json,
}

pub fn print_batches(batches: &[RecordBatch], format: OutputFormat) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Table => {
            writeln!(
                out,
                "{}",
                arrow::util::pretty::pretty_format_batches(batches)?
            )?;
        }
        OutputFormat::Csv => write_csv(&mut out, batches)?,
        OutputFormat::Json => write_json_lines(&mut out, batches)?,
    }
    Ok(())
}

fn cells(batch: &RecordBatch) -> anyhow::Result<Vec<ArrayFormatter<'_>>> {
    let options = FormatOptions::default();
    batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).map_err(Into::into))
        .collect()
}

fn write_csv(out: &mut impl Write, batches: &[RecordBatch]) -> anyhow::Result<()> {
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let quote = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let header: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| quote(f.name()))
        .collect();
    writeln!(out, "{}", header.join(","))?;
    for batch in batches {
        let formatters = cells(batch)?;
        for row in 0..batch.num_rows() {
            let line: Vec<String> = batch
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(c, f)| {
                    if c.is_null(row) {
                        String::new()
                    } else {
                        quote(&f.value(row).to_string())
                    }
                })
                .collect();
            writeln!(out, "{}", line.join(","))?;
        }
    }
    Ok(())
}

fn write_json_lines(out: &mut impl Write, batches: &[RecordBatch]) -> anyhow::Result<()> {
    for batch in batches {
        let formatters = cells(batch)?;
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            let mut object = serde_json::Map::new();
            for ((field, column), f) in schema.fields().iter().zip(batch.columns()).zip(&formatters)
            {
                let value = if column.is_null(row) {
                    serde_json::Value::Null
                } else {
                    let text = f.value(row).to_string();
                    let numeric = field.data_type().is_numeric();
                    match (numeric, field.data_type()) {
                        (_, DataType::Boolean) => serde_json::Value::Bool(text == "true"),
                        (true, _) => {
                            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
                        }
                        _ => serde_json::Value::String(text),
                    }
                };
                object.insert(field.name().clone(), value);
            }
            writeln!(out, "{}", serde_json::Value::Object(object))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn csv_quotes_what_needs_it_and_json_keeps_numbers() {
        let batch = RecordBatch::try_from_iter(vec![
            (
                "labels",
                Arc::new(arrow::array::StringArray::from(vec![
                    Some("{a=\"x,y\"}"),
                    None,
                ])) as _,
            ),
            (
                "n",
                Arc::new(arrow::array::Int64Array::from(vec![1, 2])) as _,
            ),
        ])
        .unwrap();
        let mut csv = Vec::new();
        write_csv(&mut csv, std::slice::from_ref(&batch)).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "labels,n\n\"{a=\"\"x,y\"\"}\",1\n,2\n"
        );
        let mut json = Vec::new();
        write_json_lines(&mut json, &[batch]).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(json)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["n"], 1);
        assert_eq!(lines[0]["labels"], "{a=\"x,y\"}");
        assert!(lines[1]["labels"].is_null());
    }
}
