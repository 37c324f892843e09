//! Query memory per tenant: every tenant's queries draw from the one global
//! pool, but no tenant may hold more than its share of it, so one tenant's
//! heavy queries cannot starve the others.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::common::{resources_datafusion_err, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};

/// A tenant's view of the global pool, capped at `limit` bytes.
#[derive(Debug)]
pub struct TenantPool {
    tenant: String,
    global: Arc<dyn MemoryPool>,
    used: AtomicUsize,
    limit: usize,
}

impl fmt::Display for TenantPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TenantPool({}, {} of {} bytes)",
            self.tenant,
            self.reserved(),
            self.limit
        )
    }
}

impl MemoryPool for TenantPool {
    fn name(&self) -> &str {
        "TenantPool"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.global.register(consumer)
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.global.unregister(consumer)
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.global.grow(reservation, additional);
        self.used.fetch_add(additional, Ordering::Relaxed);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.global.shrink(reservation, shrink);
        self.used.fetch_sub(shrink, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(additional).filter(|n| *n <= self.limit)
            });
        if taken.is_err() {
            return Err(resources_datafusion_err!(
                "tenant {} would hold more than its share of query memory ({} bytes) with {} more bytes for {}",
                self.tenant,
                self.limit,
                additional,
                reservation.consumer().name()
            ));
        }
        if let Err(e) = self.global.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// One pool per tenant, created on first use and kept (a pool with nothing
/// reserved costs a few bytes).
#[derive(Debug)]
pub struct TenantPools {
    global: Arc<dyn MemoryPool>,
    share: usize,
    pools: Mutex<HashMap<String, Arc<TenantPool>>>,
}

impl TenantPools {
    pub fn new(global: Arc<dyn MemoryPool>, share: usize) -> Self {
        Self {
            global,
            share,
            pools: Mutex::new(HashMap::new()),
        }
    }

    pub fn pool(&self, tenant: &str) -> Arc<TenantPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(tenant.to_string())
            .or_insert_with(|| {
                Arc::new(TenantPool {
                    tenant: tenant.to_string(),
                    global: self.global.clone(),
                    used: AtomicUsize::new(0),
                    limit: self.share,
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    #[test]
    fn a_tenant_is_capped_at_its_share_and_others_still_get_memory() {
        let global: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1000));
        let pools = TenantPools::new(global.clone(), 600);
        let a: Arc<dyn MemoryPool> = pools.pool("a");
        let b: Arc<dyn MemoryPool> = pools.pool("b");
        let ra = MemoryConsumer::new("a-query").register(&a);
        ra.try_grow(600).unwrap();
        let err = ra.try_grow(1).unwrap_err().to_string();
        assert!(err.contains("tenant a"), "{err}");
        let rb = MemoryConsumer::new("b-query").register(&b);
        rb.try_grow(400).unwrap();
        // The global pool is full now, whatever b's share says.
        assert!(rb.try_grow(1).is_err());
        assert_eq!(global.reserved(), 1000);
        drop(ra);
        assert_eq!(pools.pool("a").reserved(), 0);
        assert_eq!(global.reserved(), 400);
        rb.try_grow(200).unwrap();
    }
}
