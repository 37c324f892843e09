//! The threads SQL runs on: a runtime of its own, apart from the one that
//! takes pushes (a heavy query does not delay an acknowledgement), with
//! stacks deep enough for the deepest expression `statement` lets through.
//! Planning, optimising and evaluating an expression recurse once per
//! level, and not all of DataFusion grows its stack on demand.

use std::future::Future;

use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::SqlError;

/// Stack of each query thread. Only the pages a query touches are memory.
pub const QUERY_THREAD_STACK_BYTES: usize = 64 << 20;

pub(crate) struct QueryThreads {
    runtime: Option<Runtime>,
}

impl QueryThreads {
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("ember-query")
            .thread_stack_size(QUERY_THREAD_STACK_BYTES)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &Handle {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
    }

    /// Runs `work` on the query threads and hands back its answer. Dropping
    /// the returned future (a cancelled request, a timeout) aborts `work`.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, SqlError>> + Send + 'static,
    ) -> Result<T, SqlError> {
        let task = self.handle().spawn(work);
        let _abort = AbortOnDrop(task.abort_handle());
        task.await.map_err(task_error)?
    }

    /// Runs `plan` on the query threads and polls the stream it makes there
    /// too, so that evaluating a deep expression happens on a deep stack;
    /// the returned stream reads its batches. Dropping that stream stops
    /// the query.
    pub(crate) async fn stream(
        &self,
        plan: impl Future<Output = Result<SendableRecordBatchStream, SqlError>> + Send + 'static,
    ) -> Result<SendableRecordBatchStream, SqlError> {
        let (schema_tx, schema_rx) = oneshot::channel();
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let task = self.handle().spawn(async move {
            let mut stream = match plan.await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = schema_tx.send(Err(e));
                    return;
                }
            };
            if schema_tx.send(Ok(stream.schema())).is_err() {
                return;
            }
            loop {
                let item = tokio::select! {
                    _ = batch_tx.closed() => return,
                    item = stream.next() => item,
                };
                let Some(item) = item else { return };
                if batch_tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        let abort = AbortOnDrop(task.abort_handle());
        let schema = match schema_rx.await {
            Ok(schema) => schema?,
            // The task ended without a word: it panicked.
            Err(_) => {
                return Err(task.await.err().map_or_else(
                    || SqlError::Internal("the query stopped before it was planned".into()),
                    task_error,
                ))
            }
        };
        let batches = futures::stream::unfold((batch_rx, abort), |(mut rx, abort)| async move {
            let item = rx.recv().await?;
            Some((item, (rx, abort)))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

impl Drop for QueryThreads {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime blocks, which a caller's runtime forbids.
            runtime.shutdown_background();
        }
    }
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn task_error(e: tokio::task::JoinError) -> SqlError {
    if e.is_panic() {
        let panic = e.into_panic();
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        tracing::error!(panic = message, "a query panicked");
        SqlError::Internal(format!("the query failed: {message}"))
    } else {
        SqlError::Internal("the query was cancelled".into())
    }
}
