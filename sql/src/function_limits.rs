//! Scalar functions whose output a small argument makes huge:
//! `repeat('x', 1000000000)` or `generate_series(1, 2000000000)` build
//! gigabytes in one allocation that the memory pool never sees, since only
//! operators reserve from it. Each such function is replaced, in every
//! session, by a wrapper that refuses arguments that would build more than
//! a function's output may hold before it calls the function, and refuses
//! any output over that bound after (for the ones whose size only the
//! result tells, such as `replace` and `concat`, whose outputs can double
//! from one subquery to the next).

use std::fmt::Write;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray, StringBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type, IntervalUnit, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::DFSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};
use datafusion::logical_expr::{Expr, ExprSchemable, Volatility};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::BinaryOperator;

/// How a function's output grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text's bytes times n.
    Repeat,
    /// `lpad(text, n [, fill])`: n characters.
    Pad,
    /// `array_repeat(element, n)`: the element times n.
    ArrayRepeat,
    /// `array_resize(array, n [, value])`: n elements.
    ArrayResize,
    /// `range(start, stop, step)`: (stop - start) / step elements.
    Range,
    /// Known only from the output.
    Output,
}

const BOUNDED: [(&str, Growth); 12] = [
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("array_repeat", Growth::ArrayRepeat),
    ("array_resize", Growth::ArrayResize),
    ("range", Growth::Range),
    ("generate_series", Growth::Range),
    ("replace", Growth::Output),
    ("regexp_replace", Growth::Output),
    ("concat", Growth::Output),
    ("concat_ws", Growth::Output),
    ("array_concat", Growth::Output),
];

/// Replaces the functions above in `state` by bounded ones: none may
/// build more than `max_bytes` for one batch.
pub(crate) fn bound_functions(ctx: &SessionContext, max_bytes: usize) {
    let functions = ctx.state().scalar_functions().clone();
    for (name, growth) in BOUNDED {
        let Some(udf) = functions.get(name) else {
            continue;
        };
        let bounded = Bounded {
            udf: udf.as_ref().clone(),
            growth,
            max_bytes,
        };
        ctx.register_udf(ScalarUDF::new_from_impl(bounded));
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    udf: ScalarUDF,
    growth: Growth,
    max_bytes: usize,
}

impl Bounded {
    fn too_large(&self, bytes: u128) -> DataFusionError {
        DataFusionError::ResourcesExhausted(format!(
            "{} would build {bytes} bytes, more than one function may hold in memory ({} bytes)",
            self.udf.inner().name(),
            self.max_bytes
        ))
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.udf.inner().name()
    }

    fn aliases(&self) -> &[String] {
        self.udf.inner().aliases()
    }

    fn signature(&self) -> &Signature {
        self.udf.inner().signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.udf.inner().return_type(arg_types)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let inner = self.udf.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Bounded {
            udf: inner,
            growth: self.growth,
            max_bytes: self.max_bytes,
        }))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.udf.inner().return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.udf.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let estimate = estimated_bytes(self.growth, &args.args, args.number_rows)?;
        if estimate > self.max_bytes as u128 {
            return Err(self.too_large(estimate));
        }
        let output = self.udf.inner().invoke_with_args(args)?;
        let bytes = match &output {
            ColumnarValue::Array(a) => a.get_array_memory_size(),
            ColumnarValue::Scalar(s) => s.size(),
        };
        if bytes > self.max_bytes {
            return Err(self.too_large(bytes as u128));
        }
        Ok(output)
    }

    fn short_circuits(&self) -> bool {
        self.udf.inner().short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.udf.inner().evaluate_bounds(input)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.udf.inner().output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.udf.inner().preserves_lex_ordering(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.udf.inner().coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.udf.inner().documentation()
    }
}

/// An upper bound of the bytes `growth` builds from `args` over `rows`
/// rows (0 where only the output tells).
fn estimated_bytes(growth: Growth, args: &[ColumnarValue], rows: usize) -> Result<u128> {
    let arg = |i: usize| -> Result<Option<ArrayRef>> {
        args.get(i).map(|a| a.to_array(rows)).transpose()
    };
    Ok(match growth {
        Growth::Output => 0,
        Growth::Repeat => match (arg(0)?, arg(1)?) {
            (Some(text), Some(n)) => per_row_product(&byte_lengths(&text)?, &counts(&n)?),
            _ => 0,
        },
        // Four bytes for each character, the most UTF-8 takes.
        Growth::Pad => match arg(1)? {
            Some(n) => 4 * total(&counts(&n)?),
            None => 0,
        },
        Growth::ArrayRepeat => match (arg(0)?, arg(1)?) {
            (Some(element), Some(n)) => (bytes_per_row(&element, rows) + 8) * total(&counts(&n)?),
            _ => 0,
        },
        Growth::ArrayResize => match (arg(0)?, arg(1)?) {
            (Some(array), Some(n)) => (element_bytes(&array) + 8) * total(&counts(&n)?),
            _ => 0,
        },
        Growth::Range => 8 * range_elements(args, rows)?,
    })
}

/// Each row's value as an i64, negatives and nulls as 0.
pub(crate) fn counts(n: &ArrayRef) -> Result<Vec<u128>> {
    let n = cast(n, &DataType::Int64)?;
    Ok(n.as_primitive::<Int64Type>()
        .iter()
        .map(|v| v.unwrap_or(0).max(0) as u128)
        .collect())
}

fn total(counts: &[u128]) -> u128 {
    counts.iter().sum()
}

fn per_row_product(a: &[u128], b: &[u128]) -> u128 {
    a.iter().zip(b).map(|(x, y)| x.saturating_mul(*y)).sum()
}

/// Each row's length in bytes, for text or binary.
pub(crate) fn byte_lengths(text: &ArrayRef) -> Result<Vec<u128>> {
    match text.data_type() {
        DataType::Utf8View => byte_lengths(&cast(text, &DataType::Utf8)?),
        _ => counts(&length(text)?),
    }
}

fn bytes_per_row(values: &ArrayRef, rows: usize) -> u128 {
    (values.get_array_memory_size() / rows.max(1)) as u128
}

/// Bytes of one element of a list array (8 for anything else).
fn element_bytes(array: &ArrayRef) -> u128 {
    let values = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().values().clone(),
        DataType::LargeList(_) => array.as_list::<i64>().values().clone(),
        _ => return 8,
    };
    bytes_per_row(&values, values.len())
}

/// Elements `range`/`generate_series` would make from `args`: `(stop)`,
/// `(start, stop)` or `(start, stop, step)`, over integers, dates or
/// timestamps (dates and timestamps step by an interval).
fn range_elements(args: &[ColumnarValue], rows: usize) -> Result<u128> {
    let arrays = args
        .iter()
        .map(|a| a.to_array(rows))
        .collect::<Result<Vec<_>>>()?;
    let (start, stop, step) = match arrays.as_slice() {
        [stop] => (None, stop, None),
        [start, stop] => (Some(start), stop, None),
        [start, stop, step] => (Some(start), stop, Some(step)),
        _ => return Ok(0),
    };
    let Some(stop) = instants(stop)? else {
        return Ok(0);
    };
    let start = match start {
        Some(s) => match instants(s)? {
            Some(v) => v,
            None => return Ok(0),
        },
        None => vec![Some(0); rows],
    };
    let step = match step {
        Some(s) => steps(s)?,
        None => vec![1; rows],
    };
    Ok(start
        .iter()
        .zip(&stop)
        .zip(&step)
        .map(|((a, b), s)| match (a, b) {
            (Some(a), Some(b)) => a.abs_diff(*b) / (*s).max(1) + 1,
            _ => 0,
        })
        .sum())
}

/// Integers as they are; dates and timestamps in nanoseconds.
fn instants(values: &ArrayRef) -> Result<Option<Vec<Option<i128>>>> {
    let (values, scale) = match values.data_type() {
        DataType::Date32 => (cast(values, &DataType::Int32)?, 86_400_000_000_000i128),
        DataType::Date64 => (cast(values, &DataType::Int64)?, 1_000_000),
        DataType::Timestamp(unit, _) => (
            cast(values, &DataType::Int64)?,
            match unit {
                TimeUnit::Second => 1_000_000_000,
                TimeUnit::Millisecond => 1_000_000,
                TimeUnit::Microsecond => 1_000,
                TimeUnit::Nanosecond => 1,
            },
        ),
        t if t.is_integer() || t.is_null() => (values.clone(), 1),
        _ => return Ok(None),
    };
    let values = cast(&values, &DataType::Int64)?;
    Ok(Some(
        values
            .as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map(|v| v as i128 * scale))
            .collect(),
    ))
}

/// Each step as a positive magnitude: integers as they are, intervals in
/// nanoseconds with a month as 28 days (its least).
fn steps(step: &ArrayRef) -> Result<Vec<u128>> {
    const DAY: u128 = 86_400_000_000_000;
    if let DataType::Interval(_) = step.data_type() {
        let mdn = cast(step, &DataType::Interval(IntervalUnit::MonthDayNano))?;
        return Ok(mdn
            .as_primitive::<datafusion::arrow::datatypes::IntervalMonthDayNanoType>()
            .iter()
            .map(|v| {
                v.map_or(1, |v| {
                    v.months.unsigned_abs() as u128 * 28 * DAY
                        + v.days.unsigned_abs() as u128 * DAY
                        + v.nanoseconds.unsigned_abs() as u128
                })
            })
            .collect());
    }
    let step = cast(step, &DataType::Int64)?;
    Ok(step
        .as_primitive::<Int64Type>()
        .iter()
        .map(|v| v.map_or(1, |v| v.unsigned_abs() as u128))
        .collect())
}

/// Plans `a || b` over text as a bounded function: DataFusion evaluates it
/// as a binary operator, which no wrapper reaches, and a chain of
/// subqueries `SELECT s || s FROM (...)` doubles its output at each step.
/// Lists go on to DataFusion's planner (`array_concat`, bounded above).
pub(crate) fn bound_string_concat(ctx: &mut SessionContext, max_bytes: usize) -> Result<()> {
    let udf = Arc::new(ScalarUDF::new_from_impl(StringConcat {
        signature: Signature::variadic(vec![DataType::Utf8], Volatility::Immutable),
        max_bytes,
    }));
    ctx.register_expr_planner(Arc::new(StringConcatPlanner { udf }))
}

#[derive(Debug)]
struct StringConcatPlanner {
    udf: Arc<ScalarUDF>,
}

impl ExprPlanner for StringConcatPlanner {
    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &DFSchema,
    ) -> Result<PlannerResult<RawBinaryExpr>> {
        let text =
            |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
        if expr.op != BinaryOperator::StringConcat || !text(&expr.right.get_type(schema)?) {
            return Ok(PlannerResult::Original(expr));
        }
        let RawBinaryExpr { op, left, right } = expr;
        // A chain `a || b || c` is one call over every operand: nested
        // calls would each name their whole subtree again, and a chain of
        // 440 took 33 s to plan.
        let mut operands = match left {
            Expr::ScalarFunction(f) if Arc::ptr_eq(f.func.inner(), self.udf.inner()) => f.args,
            left if text(&left.get_type(schema)?) => vec![left],
            left => return Ok(PlannerResult::Original(RawBinaryExpr { op, left, right })),
        };
        operands.push(right);
        Ok(PlannerResult::Planned(self.udf.call(operands)))
    }
}

/// `a || b || ...` over text: null where any operand is, refused before it
/// builds more than `max_bytes`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct StringConcat {
    signature: Signature,
    max_bytes: usize,
}

impl ScalarUDFImpl for StringConcat {
    fn name(&self) -> &str {
        "string_concat"
    }

    /// Named as the operators it plans, as DataFusion names `a || b`.
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        let mut name = String::new();
        for (i, arg) in args.iter().enumerate() {
            if i > 0 {
                name.push_str(" || ");
            }
            write!(name, "{}", arg.schema_name()).expect("writing to a String");
        }
        Ok(name)
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = args
            .args
            .iter()
            .map(|a| a.to_array(rows))
            .collect::<Result<Vec<_>>>()?;
        let texts: Vec<&StringArray> = arrays.iter().map(|a| a.as_string::<i32>()).collect();
        let bytes: usize = texts.iter().map(|t| text_bytes(t)).sum();
        if bytes > self.max_bytes {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "|| would build {bytes} bytes, more than one function may hold in memory ({} bytes)",
                self.max_bytes
            )));
        }
        let mut out = StringBuilder::with_capacity(rows, bytes);
        let mut value = String::new();
        for row in 0..rows {
            if texts.iter().any(|t| t.is_null(row)) {
                out.append_null();
                continue;
            }
            value.clear();
            texts.iter().for_each(|t| value.push_str(t.value(row)));
            out.append_value(&value);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// Bytes of the strings of `array` (a slice's, not its buffer's).
fn text_bytes(array: &StringArray) -> usize {
    let offsets = array.value_offsets();
    (offsets[offsets.len() - 1] - offsets[0]) as usize
}
