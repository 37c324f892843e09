//! Regular expressions are compiled before they match, and compiling one
//! costs up to its length squared: a 32 KiB pattern held a query thread
//! for 43 s, and a 130 KB one given to `regexp_count` for minutes. The
//! operators `~ ~* !~ !~*` are Arrow kernels that no function wrapper
//! reaches, so every pattern a statement gives them, `SIMILAR TO` or a
//! `regexp_*` function is rewritten so that its text passes through
//! `bounded_regex_input(text, pattern)`, which refuses a pattern longer
//! than [`MAX_PATTERN_BYTES`], or a batch whose texts times their patterns
//! pass [`MAX_REGEX_WORK`] (matching can cost the text's length times the
//! pattern's: a 4 KiB pattern of one letter against 73 KiB of it, once a
//! row, held the fuzz harness's thread past its timeout), and returns the
//! text unchanged. (`LIKE` needs no bound: a 32 KiB pattern takes 30 ms.)

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::DFSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::FunctionRewrite;
use datafusion::logical_expr::{
    ColumnarValue, Expr, Operator, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use crate::function_limits::byte_lengths;

/// Longest regular expression a statement may give.
pub const MAX_PATTERN_BYTES: usize = 4096;

/// Most matching one batch may ask for: the sum over its rows of the text's
/// bytes times the pattern's. Label values and frames (a few hundred bytes)
/// against any reasonable pattern stay far below it.
pub const MAX_REGEX_WORK: u128 = 1 << 28;

/// Functions whose second argument is a regular expression.
const PATTERN_FUNCTIONS: [&str; 5] = [
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_replace",
];

const BOUNDED_INPUT: &str = "bounded_regex_input";

/// Makes every statement of `ctx` bound its regular expressions.
pub(crate) fn bound_patterns(ctx: &mut SessionContext) -> Result<()> {
    let udf = Arc::new(ScalarUDF::new_from_impl(BoundedInput {
        signature: Signature::any(2, Volatility::Immutable),
    }));
    ctx.register_function_rewrite(Arc::new(BoundPatterns { udf }))
}

/// Wraps the text of each regular expression operator, `SIMILAR TO` or
/// `regexp_*` call in `bounded_regex_input(text, pattern)`.
#[derive(Debug)]
struct BoundPatterns {
    udf: Arc<ScalarUDF>,
}

impl BoundPatterns {
    fn bounded(&self, text: Expr, pattern: &Expr) -> Expr {
        match text {
            Expr::ScalarFunction(f) if f.name() == BOUNDED_INPUT => Expr::ScalarFunction(f),
            text => self.udf.call(vec![text, pattern.clone()]),
        }
    }
}

impl FunctionRewrite for BoundPatterns {
    fn name(&self) -> &str {
        "bound_patterns"
    }

    fn rewrite(
        &self,
        expr: Expr,
        _schema: &DFSchema,
        _config: &ConfigOptions,
    ) -> Result<Transformed<Expr>> {
        Ok(match expr {
            Expr::BinaryExpr(mut e) if is_regular_expression(e.op) => {
                e.left = Box::new(self.bounded(*e.left, &e.right));
                Transformed::yes(Expr::BinaryExpr(e))
            }
            Expr::SimilarTo(mut e) => {
                e.expr = Box::new(self.bounded(*e.expr, &e.pattern));
                Transformed::yes(Expr::SimilarTo(e))
            }
            Expr::ScalarFunction(ScalarFunction { func, mut args })
                if PATTERN_FUNCTIONS.contains(&func.name()) && args.len() > 1 =>
            {
                let text = args.remove(0);
                args.insert(0, self.bounded(text, &args[0]));
                Transformed::yes(Expr::ScalarFunction(ScalarFunction { func, args }))
            }
            expr => Transformed::no(expr),
        })
    }
}

fn is_regular_expression(op: Operator) -> bool {
    matches!(
        op,
        Operator::RegexMatch
            | Operator::RegexIMatch
            | Operator::RegexNotMatch
            | Operator::RegexNotIMatch
    )
}

/// Its first argument (the text), unchanged, if its second (the pattern)
/// is at most [`MAX_PATTERN_BYTES`] long and matching the batch asks for at
/// most [`MAX_REGEX_WORK`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct BoundedInput {
    signature: Signature,
}

impl ScalarUDFImpl for BoundedInput {
    fn name(&self) -> &str {
        BOUNDED_INPUT
    }

    /// Named as the text, so that `a ~ b` keeps its column name.
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        Ok(args[0].schema_name().to_string())
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(args.arg_fields[0].clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let [text, pattern] = <[ColumnarValue; 2]>::try_from(args.args).map_err(|_| {
            DataFusionError::Internal("bounded_regex_input takes two arguments".into())
        })?;
        let patterns = value_lengths(&pattern, rows)?;
        let longest = patterns.iter().copied().max().unwrap_or(0);
        if longest > MAX_PATTERN_BYTES as u128 {
            return Err(DataFusionError::Execution(format!(
                "a regular expression of {longest} bytes is longer than the \
                 {MAX_PATTERN_BYTES} bytes a pattern may be"
            )));
        }
        let texts = value_lengths(&text, rows)?;
        let work: u128 = texts
            .iter()
            .zip(&patterns)
            .map(|(t, p)| t * (*p).max(1))
            .sum();
        if work > MAX_REGEX_WORK {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "matching regular expressions of up to {longest} bytes against {} bytes of \
                 text would take too long (texts times patterns over {MAX_REGEX_WORK} in \
                 one batch); shorten the pattern or the text",
                texts.iter().sum::<u128>()
            )));
        }
        Ok(text)
    }
}

/// Each row's byte length of `value` (a scalar counts once for every row).
fn value_lengths(value: &ColumnarValue, rows: usize) -> Result<Vec<u128>> {
    match value {
        ColumnarValue::Scalar(s) => {
            let one = lengths(&s.to_array_of_size(1)?)?;
            Ok(vec![one.first().copied().unwrap_or(0); rows])
        }
        ColumnarValue::Array(a) => lengths(a),
    }
}

/// Bytes of each value of `array` as the regex kernels will read it: text
/// and binary as they are, anything else (which type coercion casts to
/// text after this check) as its text; null as 0.
fn lengths(array: &ArrayRef) -> Result<Vec<u128>> {
    match array.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => byte_lengths(array),
        DataType::Null => Ok(vec![0; array.len()]),
        // Dictionaries and other types as the kernels read them: as text.
        _ => byte_lengths(&datafusion::arrow::compute::cast(array, &DataType::Utf8)?),
    }
}
