//! Regular expressions are compiled before they match, and compiling one
//! costs up to its length squared: a 32 KiB pattern held a query thread
//! for 43 s, and a 130 KB one given to `regexp_count` for minutes. The
//! operators `~ ~* !~ !~*` are Arrow kernels that no function wrapper
//! reaches, so every pattern a statement gives them, `SIMILAR TO` or a
//! `regexp_*` function is rewritten to pass through `bounded_pattern`,
//! which refuses any longer than [`MAX_PATTERN_BYTES`] and returns the rest
//! unchanged. (`LIKE` needs no bound: a 32 KiB pattern takes 30 ms.)

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::kernels::length::length;
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

/// Longest regular expression a statement may give.
pub const MAX_PATTERN_BYTES: usize = 4096;

/// Functions whose second argument is a regular expression.
const PATTERN_FUNCTIONS: [&str; 5] = [
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_replace",
];

const BOUNDED_PATTERN: &str = "bounded_pattern";

/// Makes every statement of `ctx` bound its regular expressions.
pub(crate) fn bound_patterns(ctx: &mut SessionContext) -> Result<()> {
    let udf = Arc::new(ScalarUDF::new_from_impl(BoundedPattern {
        signature: Signature::any(1, Volatility::Immutable),
    }));
    ctx.register_function_rewrite(Arc::new(BoundPatterns { udf }))
}

/// Wraps each pattern of a regular expression operator, `SIMILAR TO` or
/// `regexp_*` call in `bounded_pattern`.
#[derive(Debug)]
struct BoundPatterns {
    udf: Arc<ScalarUDF>,
}

impl BoundPatterns {
    fn bounded(&self, pattern: Expr) -> Expr {
        match pattern {
            Expr::ScalarFunction(f) if f.name() == BOUNDED_PATTERN => Expr::ScalarFunction(f),
            pattern => self.udf.call(vec![pattern]),
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
                e.right = Box::new(self.bounded(*e.right));
                Transformed::yes(Expr::BinaryExpr(e))
            }
            Expr::SimilarTo(mut e) => {
                e.pattern = Box::new(self.bounded(*e.pattern));
                Transformed::yes(Expr::SimilarTo(e))
            }
            Expr::ScalarFunction(ScalarFunction { func, mut args })
                if PATTERN_FUNCTIONS.contains(&func.name()) && args.len() > 1 =>
            {
                let pattern = args.remove(1);
                args.insert(1, self.bounded(pattern));
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

/// Its argument, unchanged, if no text in it is longer than
/// [`MAX_PATTERN_BYTES`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct BoundedPattern {
    signature: Signature,
}

impl ScalarUDFImpl for BoundedPattern {
    fn name(&self) -> &str {
        BOUNDED_PATTERN
    }

    /// Named as its argument, so that `a ~ b` keeps its column name.
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
        let [pattern] = <[ColumnarValue; 1]>::try_from(args.args)
            .map_err(|_| DataFusionError::Internal("bounded_pattern takes one argument".into()))?;
        let bytes = match &pattern {
            // One value, not `rows` copies of it.
            ColumnarValue::Scalar(s) => longest_text(&s.to_array_of_size(1)?)?,
            ColumnarValue::Array(a) => longest_text(a)?,
        };
        if bytes > MAX_PATTERN_BYTES {
            return Err(DataFusionError::Execution(format!(
                "a regular expression of {bytes} bytes is longer than the \
                 {MAX_PATTERN_BYTES} bytes a pattern may be"
            )));
        }
        Ok(pattern)
    }
}

/// Bytes of the longest value in `array` as the regex kernels will read it:
/// text and binary as they are, anything else (which type coercion casts
/// to text after this check) as its text.
fn longest_text(array: &ArrayRef) -> Result<usize> {
    let longest = |lengths: ArrayRef| -> Result<usize> {
        let lengths = datafusion::arrow::compute::cast(&lengths, &DataType::Int64)?;
        let lengths = lengths.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        Ok(lengths.iter().flatten().max().unwrap_or(0) as usize)
    };
    match array.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => longest(length(array)?),
        DataType::Dictionary(_, _) => longest_text(array.as_any_dictionary().values()),
        DataType::Null => Ok(0),
        _ => longest_text(&datafusion::arrow::compute::cast(array, &DataType::Utf8)?),
    }
}
