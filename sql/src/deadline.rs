//! The query's deadline inside planning. Nothing can interrupt an
//! optimizer rule once it runs, and a query thread busy optimising a
//! statement whose plan grows faster than its text would stay busy long
//! after its caller was told it timed out. So every analyzer and optimizer
//! rule, logical and physical, looks at the clock before it runs (a logical
//! optimizer rule, once per plan node): past the deadline, planning stops
//! with a timeout. Turning SQL into a plan, and one analyzer rule over a
//! whole plan, cannot be interrupted: the statement limits
//! (`statement.rs`) keep those short.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{AnalyzerRule, OptimizerConfig, OptimizerRule};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;

use crate::SqlError;

/// When a query must be done, and the timeout it was given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) timeout: Duration,
}

impl Deadline {
    pub(crate) fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    fn check(&self) -> Result<()> {
        if Instant::now() < self.at {
            return Ok(());
        }
        Err(DataFusionError::External(Box::new(SqlError::Timeout(
            self.timeout,
        ))))
    }
}

/// `state` with each of its analyzer and optimizer rules checking
/// `deadline` first.
pub(crate) fn state_within(state: SessionState, deadline: Deadline) -> SessionState {
    let mut builder = SessionStateBuilder::new_from_existing(state);
    if let Some(analyzer) = builder.analyzer() {
        analyzer.rules = analyzer
            .rules
            .iter()
            .map(|rule| Arc::new(Timed::new(rule, deadline)) as _)
            .collect();
    }
    if let Some(optimizer) = builder.optimizer() {
        optimizer.rules = optimizer
            .rules
            .iter()
            .map(|rule| Arc::new(Timed::new(rule, deadline)) as _)
            .collect();
    }
    if let Some(physical) = builder.physical_optimizers() {
        physical.rules = physical
            .rules
            .iter()
            .map(|rule| Arc::new(Timed::new(rule, deadline)) as _)
            .collect();
    }
    builder.build()
}

/// A rule that runs only before the deadline.
struct Timed<R: ?Sized> {
    rule: Arc<R>,
    deadline: Deadline,
}

impl<R: ?Sized> Timed<R> {
    fn new(rule: &Arc<R>, deadline: Deadline) -> Self {
        Self {
            rule: rule.clone(),
            deadline,
        }
    }
}

impl<R: ?Sized + fmt::Debug> fmt::Debug for Timed<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.rule.fmt(f)
    }
}

impl AnalyzerRule for Timed<dyn AnalyzerRule + Send + Sync> {
    fn analyze(&self, plan: LogicalPlan, config: &ConfigOptions) -> Result<LogicalPlan> {
        self.deadline.check()?;
        self.rule.analyze(plan, config)
    }

    fn name(&self) -> &str {
        self.rule.name()
    }
}

impl OptimizerRule for Timed<dyn OptimizerRule + Send + Sync> {
    fn name(&self) -> &str {
        self.rule.name()
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        self.rule.apply_order()
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        self.deadline.check()?;
        self.rule.rewrite(plan, config)
    }
}

impl PhysicalOptimizerRule for Timed<dyn PhysicalOptimizerRule + Send + Sync> {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.deadline.check()?;
        self.rule.optimize(plan, config)
    }

    fn optimize_with_context(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        context: &dyn datafusion::physical_optimizer::PhysicalOptimizerContext,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.deadline.check()?;
        self.rule.optimize_with_context(plan, context)
    }

    fn name(&self) -> &str {
        self.rule.name()
    }

    fn schema_check(&self) -> bool {
        self.rule.schema_check()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::ErrorKind;

    async fn physical_plan(state: &SessionState) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = state.create_logical_plan("SELECT 1 + 1 AS two").await?;
        state.create_physical_plan(&plan).await
    }

    #[tokio::test]
    async fn rules_run_before_the_deadline_and_stop_past_it() {
        let state = SessionContext::new().state();
        let ahead = state_within(state.clone(), Deadline::after(Duration::from_secs(60)));
        physical_plan(&ahead)
            .await
            .expect("plans before its deadline");

        let past = state_within(state, Deadline::after(Duration::ZERO));
        let err = SqlError::from(physical_plan(&past).await.expect_err("stops past it"));
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[test]
    fn every_rule_is_kept_in_its_place() {
        let state = SessionContext::new().state();
        let timed = state_within(state.clone(), Deadline::after(Duration::from_secs(60)));
        let names = |rules: Vec<&str>| rules.join(",");
        assert_eq!(
            names(timed.analyzer().rules.iter().map(|r| r.name()).collect()),
            names(state.analyzer().rules.iter().map(|r| r.name()).collect())
        );
        assert_eq!(
            names(timed.optimizers().iter().map(|r| r.name()).collect()),
            names(state.optimizers().iter().map(|r| r.name()).collect())
        );
        assert_eq!(
            names(
                timed
                    .physical_optimizers()
                    .iter()
                    .map(|r| r.name())
                    .collect()
            ),
            names(
                state
                    .physical_optimizers()
                    .iter()
                    .map(|r| r.name())
                    .collect()
            )
        );
        assert!(!state.optimizers().is_empty());
        assert_eq!(
            timed.analyzer().function_rewrites.len(),
            state.analyzer().function_rewrites.len()
        );
    }
}
