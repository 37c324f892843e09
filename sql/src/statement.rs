//! A client's SQL text turned into a statement the planner can take without
//! recursing past a thread's stack.
//!
//! The parser bounds nesting (parentheses, subqueries), but a flat chain of
//! infix operators (`1+1+1...`, `a = 0 OR a = 1 OR ...`) parses in a loop
//! into a left-deep tree as deep as the chain is long, and planning,
//! optimising, evaluating and even dropping that tree recurse once per
//! level. So: the text has a size limit, chains of `AND` and `OR` (which
//! Grafana builds from multi-value variables, and which are associative) are
//! rebalanced into trees of logarithmic depth, and any expression still
//! deeper than the limit is refused before planning.
//!
//! Planning also grows faster than the number of subqueries and tables a
//! statement names (each becomes a join whose schema holds every column
//! before it), and nothing can interrupt an optimizer rule once it runs:
//! so that number has a limit too. A CTE is planned again at each
//! reference, so each reference counts its queries, tables and expressions
//! again.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::execution::SessionState;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Query, TableFactor, Value, VisitMut, VisitorMut,
};

use crate::SqlError;

/// The deepest expression the query threads' stacks are tested with
/// (`long_operator_chains_answer_or_are_refused_without_harm`): the most
/// `--max-expression-depth` may be.
pub const MAX_EXPRESSION_DEPTH: usize = 2000;

/// The deepest expression by default: planning time grows with the square
/// of a chain's length (a chain of 1,849 `0 % 0` held the fuzz harness's
/// query thread for over a minute in a debug build, one of 1,000 takes a
/// third of that), and no query a person or Grafana writes comes near.
pub const DEFAULT_EXPRESSION_DEPTH: usize = 1024;

/// Longest chain of one operator that DataFusion plans as nested function
/// calls (`a || b || c` over lists is `array_concat(array_concat(a, b), c)`,
/// `@>` is `array_has_all`...): each call names and types its whole
/// subtree again, so planning grows with the cube of the chain (440 list
/// concatenations held a query thread for over ten seconds).
pub const MAX_FUNCTION_CHAIN: usize = 128;

/// What a statement may be.
#[derive(Debug, Clone, Copy)]
pub struct StatementLimits {
    /// Bytes of SQL text.
    pub max_bytes: usize,
    /// Levels of one expression tree, after `AND`/`OR` chains are balanced
    /// (at most `MAX_EXPRESSION_DEPTH`).
    pub max_expression_depth: usize,
    /// Queries (the statement, each subquery and CTE) and tables (each
    /// table, table function and derived table in a `FROM` or `JOIN`) one
    /// statement may name.
    pub max_relations: usize,
    /// The sum, over every expression node, of its depth times the number
    /// of queries it is nested in: what planning an expression costs, since
    /// the planner derives each node's type and name from its whole subtree,
    /// and again in each enclosing query. A chain of 1,000 terms costs about
    /// 1 million, and 5 million five subqueries deep.
    pub max_expression_cost: usize,
}

impl Default for StatementLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_expression_depth: DEFAULT_EXPRESSION_DEPTH,
            max_relations: 256,
            max_expression_cost: 2_000_000,
        }
    }
}

/// `sql` parsed for `state`, within `limits`: the one statement it holds,
/// with `AND`/`OR` chains balanced.
pub(crate) fn parse(
    state: &SessionState,
    sql: &str,
    limits: StatementLimits,
) -> Result<Statement, SqlError> {
    if sql.len() > limits.max_bytes {
        return Err(SqlError::InvalidQuery(format!(
            "the statement is {} bytes, more than the limit of {} (--max-statement-bytes)",
            sql.len(),
            limits.max_bytes
        )));
    }
    let dialect = state.config().options().sql_parser.dialect;
    let mut statement = state.sql_to_statement(sql, &dialect)?;
    let limit = limits.max_expression_depth.min(MAX_EXPRESSION_DEPTH);
    let mut check = ShapeCheck {
        depth: 0,
        limit,
        relations: 0,
        max_relations: limits.max_relations,
        queries: 0,
        cost: 0,
        max_cost: limits.max_expression_cost,
        ctes: CteCosts::default(),
    };
    let Some(refusal) = visit_sql(&mut statement, &mut check).break_value() else {
        return Ok(statement);
    };
    if refusal != Refusal::Relations {
        // Dropping the tree would recurse as deep as it is: take it apart
        // from its leaves up instead.
        let _ = visit_sql(&mut statement, &mut Dismantle);
    }
    Err(SqlError::InvalidQuery(match refusal {
        Refusal::Depth => format!(
            "an expression nests deeper than {limit} levels (--max-expression-depth); \
             long lists of values fit in `IN (...)`"
        ),
        Refusal::Cost => format!(
            "the statement's expressions are too large to plan: the depths of their \
             nodes, times the queries they are nested in, add up to more than {} \
             (--max-expression-cost); long lists of values fit in `IN (...)`",
            limits.max_expression_cost
        ),
        Refusal::FunctionChain => format!(
            "a chain of `||` (or `@>`, `<@`, `->`...) joins more than {MAX_FUNCTION_CHAIN} \
             operands; `concat(...)` or `array_concat(...)` take many at once"
        ),
        Refusal::Relations => format!(
            "the statement names more than {} queries and tables \
             (--max-statement-relations)",
            limits.max_relations
        ),
    }))
}

/// Visits the SQL trees of DataFusion's statement. Statements other than
/// queries and EXPLAIN are refused by planning anyway; their SQL parts are
/// visited all the same, so that nothing deep reaches the planner.
fn visit_sql<V: VisitorMut>(statement: &mut Statement, visitor: &mut V) -> ControlFlow<V::Break> {
    match statement {
        Statement::Statement(s) => s.visit(visitor),
        Statement::Explain(e) => visit_sql(&mut e.statement, visitor),
        Statement::CopyTo(c) => match &mut c.source {
            datafusion::sql::parser::CopyToSource::Query(q) => q.visit(visitor),
            datafusion::sql::parser::CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        Statement::CreateExternalTable(_) | Statement::Reset(_) => ControlFlow::Continue(()),
    }
}

/// The limit [`ShapeCheck`] stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Depth,
    Cost,
    FunctionChain,
    Relations,
}

/// Balances `AND`/`OR` chains on the way down, and breaks once an
/// expression is deeper than `limit`, its nodes' depths (times the queries
/// they are nested in) add up to more than `max_cost`, or the statement has
/// named more than `max_relations` queries and tables.
struct ShapeCheck {
    depth: usize,
    limit: usize,
    relations: usize,
    max_relations: usize,
    /// Queries the visit is inside.
    queries: usize,
    cost: usize,
    max_cost: usize,
    ctes: CteCosts,
}

impl ShapeCheck {
    fn count_relation(&mut self) -> ControlFlow<Refusal> {
        self.count_relations(1)
    }

    fn count_relations(&mut self, relations: usize) -> ControlFlow<Refusal> {
        self.relations += relations;
        if self.relations > self.max_relations {
            return ControlFlow::Break(Refusal::Relations);
        }
        ControlFlow::Continue(())
    }

    fn count_cost(&mut self, cost: usize) -> ControlFlow<Refusal> {
        self.cost += cost;
        if self.cost > self.max_cost {
            return ControlFlow::Break(Refusal::Cost);
        }
        ControlFlow::Continue(())
    }

    /// What the visit has counted so far.
    fn spent(&self) -> Spent {
        Spent {
            relations: self.relations,
            cost: self.cost,
        }
    }
}

/// Relations and expression cost counted by a [`ShapeCheck`].
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    relations: usize,
    cost: usize,
}

/// What each CTE of the statement cost to check, by name: the planner plans
/// a CTE's query again at every reference to it.
#[derive(Default)]
struct CteCosts {
    /// CTE queries not visited yet, by address, with their names.
    declared: HashMap<*const Query, String>,
    /// CTE queries being visited: their address, name and what the visit
    /// had spent when it entered them.
    open: Vec<(*const Query, String, Spent)>,
    /// What each visited CTE's query spent, references to earlier CTEs
    /// included. Names are compared case-blind: counting a reference to a
    /// table that shares a CTE's name is harmless.
    spent: HashMap<String, Spent>,
}

impl CteCosts {
    fn declare(&mut self, query: &Query) {
        for cte in query.with.iter().flat_map(|with| &with.cte_tables) {
            let name = cte.alias.name.value.to_lowercase();
            self.declared.insert(&*cte.query as *const Query, name);
        }
    }

    fn enter(&mut self, query: &Query, spent: Spent) {
        let address = query as *const Query;
        if let Some(name) = self.declared.remove(&address) {
            self.open.push((address, name, spent));
        }
    }

    fn leave(&mut self, query: &Query, spent: Spent) {
        let is_open =
            matches!(self.open.last(), Some((address, ..)) if std::ptr::eq(*address, query));
        if !is_open {
            return;
        }
        if let Some((_, name, entered)) = self.open.pop() {
            let cte = Spent {
                relations: spent.relations - entered.relations,
                cost: spent.cost - entered.cost,
            };
            self.spent.insert(name, cte);
        }
    }

    /// What planning `factor` again costs if it names a CTE.
    fn reference(&self, factor: &TableFactor) -> Option<Spent> {
        let TableFactor::Table { name, .. } = factor else {
            return None;
        };
        let [part] = name.0.as_slice() else {
            return None;
        };
        let ident = part.as_ident()?;
        self.spent.get(&ident.value.to_lowercase()).copied()
    }
}

impl VisitorMut for ShapeCheck {
    type Break = Refusal;

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Refusal> {
        balance(expr);
        if function_chain(expr) > MAX_FUNCTION_CHAIN {
            return ControlFlow::Break(Refusal::FunctionChain);
        }
        self.depth += 1;
        if self.depth > self.limit {
            return ControlFlow::Break(Refusal::Depth);
        }
        self.count_cost(self.depth * self.queries.max(1))
    }

    fn post_visit_expr(&mut self, _expr: &mut Expr) -> ControlFlow<Refusal> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<Refusal> {
        self.ctes.enter(query, self.spent());
        self.ctes.declare(query);
        self.queries += 1;
        self.count_relation()
    }

    fn post_visit_query(&mut self, query: &mut Query) -> ControlFlow<Refusal> {
        self.queries -= 1;
        self.ctes.leave(query, self.spent());
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<Refusal> {
        if let Some(cte) = self.ctes.reference(factor) {
            self.count_relations(cte.relations)?;
            self.count_cost(cte.cost)?;
        }
        self.count_relation()
    }
}

/// Operands of the chain of one function-planned operator that `expr`
/// ends (0 if it is no such operator).
fn function_chain(expr: &Expr) -> usize {
    let Expr::BinaryOp { op, .. } = expr else {
        return 0;
    };
    let planned_as_function = matches!(
        op,
        BinaryOperator::StringConcat
            | BinaryOperator::AtArrow
            | BinaryOperator::ArrowAt
            | BinaryOperator::Arrow
            | BinaryOperator::LongArrow
            | BinaryOperator::HashArrow
            | BinaryOperator::HashLongArrow
    );
    if !planned_as_function {
        return 0;
    }
    let mut operands = 1;
    let mut link = expr;
    while let Expr::BinaryOp { left, op: o, .. } = link {
        if o != op {
            break;
        }
        operands += 1;
        link = left;
    }
    operands
}

/// Replaces every expression by a leaf, children first, so that each drop
/// is one level deep.
struct Dismantle;

impl VisitorMut for Dismantle {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        *expr = Expr::value(Value::Null);
        ControlFlow::Continue(())
    }
}

/// If `expr` is a chain of one associative operator (`AND` or `OR`), the
/// same chain as a balanced tree, its operands in the same order.
fn balance(expr: &mut Expr) {
    let op = match expr {
        Expr::BinaryOp {
            op: op @ (BinaryOperator::And | BinaryOperator::Or),
            ..
        } => op.clone(),
        _ => return,
    };
    let mut operands = Vec::new();
    // Depth first, right child pushed first: operands come out left to right.
    let mut pending = vec![std::mem::replace(expr, Expr::value(Value::Null))];
    while let Some(e) = pending.pop() {
        match e {
            Expr::BinaryOp { left, op: o, right } if o == op => {
                pending.push(*right);
                pending.push(*left);
            }
            other => operands.push(other),
        }
    }
    *expr = balanced(operands, &op);
}

/// `operands` joined by `op` as a tree of depth log2(n).
fn balanced(mut operands: Vec<Expr>, op: &BinaryOperator) -> Expr {
    if operands.len() == 1 {
        return operands.pop().expect("one operand");
    }
    let right = operands.split_off(operands.len() / 2);
    Expr::BinaryOp {
        left: Box::new(balanced(operands, op)),
        op: op.clone(),
        right: Box::new(balanced(right, op)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    fn parse_default(sql: &str) -> Result<Statement, SqlError> {
        parse(
            &SessionContext::new().state(),
            sql,
            StatementLimits::default(),
        )
    }

    #[test]
    fn or_chains_become_balanced_and_keep_their_order() {
        let terms: Vec<String> = (0..5000).map(|i| format!("v = {i}")).collect();
        let sql = format!("SELECT 1 WHERE {}", terms.join(" OR "));
        let statement = parse_default(&sql).expect("a long OR list is accepted");
        let text = statement.to_string();
        // Same operands in the same order, parenthesised differently.
        let flat = text.replace(['(', ')'], "");
        assert!(flat.contains(&terms.join(" OR ")), "operands kept in order");
    }

    #[test]
    fn a_chain_past_the_depth_limit_is_refused_with_the_reason() {
        let sql = format!("SELECT 1{}", "+1".repeat(100_000));
        let err = parse_default(&sql).expect_err("too deep");
        assert!(matches!(err, SqlError::InvalidQuery(_)), "{err:?}");
        assert!(err.to_string().contains("deeper than 1024"), "{err}");
        let sql = format!("SELECT 1{}", "+1".repeat(1000));
        parse_default(&sql).expect("a chain within the limit is accepted");
    }

    #[test]
    fn a_statement_naming_too_many_queries_and_tables_is_refused() {
        // The statement and 254 scalar subqueries, each over one table:
        // 509 relations.
        let many = format!("SELECT 1{}", " + (SELECT 1 FROM t)".repeat(254));
        let err = parse_default(&many).expect_err("too many subqueries");
        assert!(matches!(err, SqlError::InvalidQuery(_)), "{err:?}");
        assert!(
            err.to_string().contains("--max-statement-relations"),
            "{err}"
        );
        // 1 + 127 * 2 = 255 relations.
        let some = format!("SELECT 1{}", " + (SELECT 1 FROM t)".repeat(127));
        parse_default(&some).expect("within the limit");
        let tables = vec!["t"; 300].join(", ");
        let err = parse_default(&format!("SELECT 1 FROM {tables}")).expect_err("300 tables");
        assert!(err.to_string().contains("more than 256"), "{err}");
    }

    #[test]
    fn expressions_too_costly_to_plan_are_refused_with_the_reason() {
        // Chains of 900 terms: each within the depth limit, three together
        // past the cost limit (about 810 thousand each).
        let chain = format!("1{}", " + 1".repeat(900));
        let sql = format!("SELECT {chain}, {chain}, {chain}");
        let err = parse_default(&sql).expect_err("too costly");
        assert!(matches!(err, SqlError::InvalidQuery(_)), "{err:?}");
        assert!(err.to_string().contains("--max-expression-cost"), "{err}");
        parse_default(&format!("SELECT {chain}, {chain}")).expect("within the limit");
        // Each enclosing query derives the chain's names and types again:
        // a chain of 1,519 products five subqueries deep held the fuzz
        // harness's query thread past its timeout (30 s in a debug build;
        // 5.6 s at the top).
        let nested = |levels: usize, terms: usize| {
            let mut sql = format!("1{}", " * 1".repeat(terms));
            for _ in 0..levels {
                sql = format!("SELECT ({sql})");
            }
            sql
        };
        parse_default(&nested(1, 1_000)).expect("at the top");
        let err = parse_default(&nested(3, 1_000)).expect_err("three deep");
        assert!(err.to_string().contains("--max-expression-cost"), "{err}");
    }

    #[test]
    fn each_reference_to_a_cte_counts_its_cost_again() {
        // The planner plans a CTE at each reference: a 700-term chain
        // referenced 40 times held a query thread for 54 s in a debug build
        // (2 s once), inside planning, which no deadline interrupts.
        let cte = format!("WITH t AS (SELECT 1{} AS v)", " + 1".repeat(700));
        let references = |n: usize| {
            let tables: Vec<String> = (1..=n).map(|i| format!("t t{i}")).collect();
            format!("{cte} SELECT count(*) FROM {}", tables.join(", "))
        };
        parse_default(&references(1)).expect("one reference");
        let err = parse_default(&references(40)).expect_err("forty references");
        assert!(err.to_string().contains("--max-expression-cost"), "{err}");
        // Case-blind, as unquoted names are.
        let upper = format!("{cte} SELECT count(*) FROM T a, T b, T c, T d, T e");
        assert!(parse_default(&upper).is_err(), "upper-case references");
        // A CTE naming another counts the other's references as its own.
        let nested =
            format!("{cte}, u AS (SELECT a.v FROM t a, t b) SELECT count(*) FROM u x, u y, u z");
        let err = parse_default(&nested).expect_err("nested references");
        assert!(err.to_string().contains("--max-expression-cost"), "{err}");
        // The queries and tables a CTE names count again at each reference.
        let tables: Vec<String> = (1..=60).map(|i| format!("(SELECT {i}) s{i}")).collect();
        let wide = format!("WITH w AS (SELECT 1 FROM {}) ", tables.join(", "));
        parse_default(&format!("{wide} SELECT * FROM w")).expect("one reference");
        let err = parse_default(&format!("{wide} SELECT * FROM w a, w b, w c"))
            .expect_err("three references");
        assert!(
            err.to_string().contains("--max-statement-relations"),
            "{err}"
        );
    }

    #[test]
    fn long_chains_of_function_operators_are_refused_with_the_reason() {
        let chain = |n: usize, term: &str| format!("SELECT {}", vec![term; n].join(" || "));
        parse_default(&chain(MAX_FUNCTION_CHAIN, "[1, 2, 3]")).expect("within the limit");
        for term in ["[1, 2, 3]", "'x'"] {
            let err = parse_default(&chain(MAX_FUNCTION_CHAIN + 1, term)).expect_err("too long");
            assert!(matches!(err, SqlError::InvalidQuery(_)), "{err:?}");
            assert!(
                err.to_string().contains("joins more than 128 operands"),
                "{err}"
            );
        }
        // Other operators' chains stay within the depth limit only.
        parse_default(&format!("SELECT 1{}", " + 1".repeat(1_000))).expect("a + chain");
    }

    #[test]
    fn a_statement_past_the_size_limit_is_refused() {
        let sql = format!("SELECT '{}'", "x".repeat(2 << 20));
        let err = parse_default(&sql).expect_err("too large");
        assert!(err.to_string().contains("--max-statement-bytes"), "{err}");
    }
}
