//! Query cancellation (`CancelFlightInfo`, and Flight SQL's older
//! `CancelQuery`). Every ticket Ember hands out carries a query id of its
//! own; cancelling it stops the query where it is (the DataFusion stream is
//! dropped, which stops its work) or, if it has not been fetched yet, makes
//! the fetch fail. Ids are per tenant: one tenant cannot cancel another's.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::Status;

/// Cancelled ids remembered for tickets not fetched yet (oldest forgotten).
const REMEMBERED: usize = 10_000;

type Key = (String, String);

#[derive(Default)]
pub struct Cancellations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<Key, watch::Sender<bool>>,
    cancelled: HashSet<Key>,
    order: VecDeque<Key>,
}

/// A query being streamed; its entry goes when it is dropped.
pub struct Running {
    registry: Arc<Cancellations>,
    key: Key,
    cancelled: watch::Receiver<bool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.registry.lock().running.remove(&self.key);
    }
}

impl Cancellations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cancels a query id of the tenant: a running query stops, a ticket
    /// not fetched yet will be refused.
    pub fn cancel(&self, tenant: &str, id: &str) {
        let key = (tenant.to_string(), id.to_string());
        let mut inner = self.lock();
        if let Some(tx) = inner.running.get(&key) {
            let _ = tx.send(true);
        }
        if inner.cancelled.insert(key.clone()) {
            inner.order.push_back(key);
            if inner.order.len() > REMEMBERED {
                if let Some(old) = inner.order.pop_front() {
                    inner.cancelled.remove(&old);
                }
            }
        }
    }

    /// Registers a query about to stream, unless it was cancelled already.
    pub fn start(self: &Arc<Self>, tenant: &str, id: &str) -> Result<Running, Status> {
        let key = (tenant.to_string(), id.to_string());
        let mut inner = self.lock();
        if inner.cancelled.contains(&key) {
            return Err(cancelled());
        }
        let (tx, rx) = watch::channel(false);
        inner.running.insert(key.clone(), tx);
        Ok(Running {
            registry: self.clone(),
            key,
            cancelled: rx,
        })
    }
}

fn cancelled() -> Status {
    Status::cancelled("the query was cancelled")
}

/// The stream until its query is cancelled, then one `CANCELLED` status;
/// the stream itself is dropped at once, which stops its work.
pub fn until_cancelled<S, T>(stream: S, running: Running) -> impl Stream<Item = Result<T, Status>>
where
    S: Stream<Item = Result<T, Status>> + Send + Unpin,
{
    futures::stream::unfold(Some((stream, running)), |state| async move {
        let (mut stream, mut running) = state?;
        let next = tokio::select! {
            item = stream.next() => Some(item),
            Ok(_) = running.cancelled.wait_for(|c| *c) => None,
        };
        match next {
            Some(item) => item.map(|item| (item, Some((stream, running)))),
            None => Some((Err(cancelled()), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancelled_query_stops_and_a_cancelled_ticket_is_refused() {
        let registry = Arc::new(Cancellations::default());
        let running = registry.start("t", "q1").unwrap();
        let endless = futures::stream::repeat_with(|| Ok::<_, Status>(1)).boxed();
        let mut s = Box::pin(until_cancelled(endless, running));
        assert_eq!(s.next().await.unwrap().unwrap(), 1);
        // Another tenant's cancel of the same id changes nothing.
        registry.cancel("other", "q1");
        assert_eq!(s.next().await.unwrap().unwrap(), 1);
        registry.cancel("t", "q1");
        let mut saw_cancel = false;
        while let Some(item) = s.next().await {
            if let Err(e) = item {
                assert_eq!(e.code(), tonic::Code::Cancelled);
                saw_cancel = true;
            }
        }
        assert!(saw_cancel);
        assert!(registry.lock().running.is_empty());
        assert_eq!(
            registry.start("t", "q1").err().unwrap().code(),
            tonic::Code::Cancelled
        );
        assert!(registry.start("t", "q2").is_ok());
    }
}
