//! Threads kept for the life of the process, for the distributor's
//! decoding.
//!
//! Tokio's blocking pool hands each task to whichever of its idle threads
//! has waited longest, so under load the decodes rotated over eight or
//! more threads and each allocated from the heap of a thread that had not
//! run for several requests: memory long out of the cache. mimalloc's
//! allocation fast path alone was 5.5 % of the server's time under full
//! load, nearly all of it one load from each cold free block. A pool of
//! one thread per core takes the next request on a thread that just
//! finished one. (The shards' block encoding stays on the blocking pool:
//! a pool of its own measured no better, 917 k and 915 k samples per
//! server CPU-second against 902 k and 1.08 M interleaved.)

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

pub struct Pool {
    jobs: mpsc::Sender<Job>,
    /// How many threads started: with none, a job would wait forever.
    started: usize,
}

/// Why a job did not return.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("no thread of the pool could start")]
    NoThreads,
    #[error("the task panicked")]
    Panicked,
    #[error("the pool is shut down")]
    ShutDown,
}

impl Pool {
    /// `threads` threads named `name-0`, `name-1`...
    pub fn start(name: &str, threads: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut started = 0;
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || take_jobs(&queue));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(name, error = %e, "could not start a thread"),
            }
        }
        Pool { jobs, started }
    }

    /// Runs `task` on a thread of the pool and returns what it returned.
    pub async fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        if self.started == 0 {
            return Err(PoolError::NoThreads);
        }
        let (done, result) = tokio::sync::oneshot::channel();
        let job = move || {
            // A task that panics fails its caller, not the thread.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
            let _ = done.send(outcome);
        };
        self.jobs
            .send(Box::new(job))
            .map_err(|_| PoolError::ShutDown)?;
        match result.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::ShutDown),
        }
    }
}

/// A pool thread's loop, until the pool is dropped. The lock is held while
/// waiting: one idle thread waits for the next job, the others for the lock.
fn take_jobs(queue: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_return_their_results_and_a_panic_fails_only_its_own() {
        let pool = Pool::start("test-pool", 2);
        let ran = futures::future::join_all(
            (0..8).map(|i| pool.run(move || (i, std::thread::current().name().map(String::from)))),
        )
        .await;
        for (i, got) in ran.into_iter().enumerate() {
            let (j, name) = got.unwrap();
            assert_eq!(j, i);
            assert!(name.unwrap().starts_with("test-pool-"));
        }
        assert_eq!(
            pool.run(|| panic!("a bad profile")).await,
            Err(PoolError::Panicked)
        );
        // Both threads still take work after one panicked.
        let after = futures::future::join_all((0..4).map(|i| pool.run(move || i * 2))).await;
        let after: Vec<i32> = after.into_iter().map(Result::unwrap).collect();
        assert_eq!(after, vec![0, 2, 4, 6]);
    }
}
