//! The processes of a cluster, as they register: each one names its roles
//! and address and renews a lease on them through the metastore's log, so
//! every replica knows the same processes, and a process that dies drops
//! out once its lease ends. Nothing else keeps a list of processes.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use ember_engine::profile::now_nanos;

use crate::{
    advance_applied, command, store_err, Instance, LogPosition, Metastore, MetastoreClient,
    MetastoreError, RegisterInstance, INSTANCES,
};

/// How long a registration holds without a renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// Renewals come this often: two can fail before the lease ends.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// An instance whose lease ended this long ago is forgotten.
const FORGET_AFTER_NANOS: i64 = 3600 * 1_000_000_000;
const MAX_ROLES: usize = 16;
const MAX_FIELD_BYTES: usize = 256;

impl Metastore {
    pub(crate) fn register_instance(
        &self,
        cmd: RegisterInstance,
        position: LogPosition,
    ) -> Result<(), MetastoreError> {
        let instance = cmd.instance.ok_or_else(|| {
            MetastoreError::InvalidCommand("RegisterInstance names no instance".into())
        })?;
        check(&instance)?;
        let forgotten: Vec<String> = self
            .read_index()
            .instances
            .values()
            .filter(|i| i.id != instance.id)
            .filter(|i| i.lease_expires.saturating_add(FORGET_AFTER_NANOS) < cmd.now)
            .map(|i| i.id.clone())
            .collect();
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = tx.open_table(INSTANCES).map_err(store_err)?;
            table
                .insert(instance.id.as_str(), instance.encode_to_vec().as_slice())
                .map_err(store_err)?;
            for id in &forgotten {
                table.remove(id.as_str()).map_err(store_err)?;
            }
        }
        advance_applied(&tx, 1, position)?;
        tx.commit().map_err(store_err)?;
        let mut index = self.write_index();
        for id in &forgotten {
            index.instances.remove(id);
        }
        index.instances.insert(instance.id.clone(), instance);
        Ok(())
    }

    /// The processes whose lease had not ended at `now`, by id.
    pub fn live_instances(&self, now: i64) -> Vec<Instance> {
        self.read_index()
            .instances
            .values()
            .filter(|i| i.lease_expires > now)
            .cloned()
            .collect()
    }
}

fn check(instance: &Instance) -> Result<(), MetastoreError> {
    let too_long = [&instance.id, &instance.address]
        .into_iter()
        .chain(&instance.roles)
        .any(|s| s.len() > MAX_FIELD_BYTES);
    if instance.id.is_empty() || too_long || instance.roles.len() > MAX_ROLES {
        return Err(MetastoreError::InvalidCommand(format!(
            "RegisterInstance: an id, at most {MAX_ROLES} roles and fields of at most \
             {MAX_FIELD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Registers `instance` and renews its lease until the process ends. A
/// renewal that fails is logged and tried again at the next turn; the lease
/// outlasts two of them.
pub async fn register_forever(metastore: Arc<dyn MetastoreClient>, instance: Instance) {
    let mut registered = false;
    loop {
        let now = now_nanos();
        let lease = Instance {
            lease_expires: now.saturating_add(LEASE.as_nanos() as i64),
            ..instance.clone()
        };
        let command = command::Kind::RegisterInstance(RegisterInstance {
            instance: Some(lease),
            now,
        });
        match metastore.apply(command.into()).await {
            Ok(_) if !registered => {
                registered = true;
                tracing::info!(id = %instance.id, roles = ?instance.roles, "registered with the metastore");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "renewing this process's registration"),
        }
        tokio::time::sleep(RENEW_EVERY).await;
    }
}
