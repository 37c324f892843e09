//! Every stack node the query backend has read, per tenant, by its id. Node
//! ids are hashes of the path, the same in every block, so a tenant's blocks
//! share their nodes: a flame graph reads the stacks sections only of the
//! datasets whose nodes are not loaded yet, and a warm query reads none.
//!
//! Each tenant has its own dictionary. Ids are 64-bit FNV hashes, which a
//! client can make collide on purpose; a shared dictionary would let such a
//! collision name one tenant's frame in another tenant's flame graph.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, UInt64Type};
use datafusion::error::{DataFusionError, Result};
use ember_engine::block::{read_section_as, Section};
use ember_engine::{DatasetKey, DatasetRef};
use object_store::ObjectStore;

use crate::lru::ByteLru;

/// Node id -> (parent id, frame name). Hashed with foldhash: a flame graph
/// looks up every node it draws here, and SipHash was most of that cost.
pub type StackNodes = foldhash::HashMap<u64, (u64, Arc<str>)>;

/// Bytes a node costs in the map (id, parent, name pointer, hashing slack).
const NODE_BYTES: usize = 48;
/// Bytes a distinct name costs besides its text.
const NAME_BYTES: usize = 40;
const DATASET_BYTES: usize = 96;

#[derive(Default)]
pub struct Nodes {
    nodes: StackNodes,
    names: foldhash::HashSet<Arc<str>>,
    loaded: HashSet<DatasetKey>,
    bytes: usize,
}

impl Nodes {
    pub fn get(&self, id: u64) -> Option<(u64, &str)> {
        self.nodes.get(&id).map(|(p, n)| (*p, n.as_ref()))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Approximate memory held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        self.bytes += NAME_BYTES + name.len();
        n
    }

    pub fn insert(&mut self, id: u64, parent: u64, name: &str) {
        if !self.nodes.contains_key(&id) {
            let name = self.name(name);
            self.nodes.insert(id, (parent, name));
            self.bytes += NODE_BYTES;
        }
    }

    /// Inserts the nodes of a stacks section batch read by
    /// [`read_stacks_section`]: each distinct name is hashed once per batch,
    /// not once per node.
    pub fn insert_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        let column = |i: usize| {
            batch.columns().get(i).ok_or_else(|| {
                DataFusionError::Internal(format!("stacks batch without column {i}"))
            })
        };
        let ids = column(0)?.as_primitive_opt::<UInt64Type>();
        let parents = column(1)?.as_primitive_opt::<UInt64Type>();
        let names = column(2)?.as_dictionary_opt::<Int32Type>();
        let (Some(ids), Some(parents), Some(names)) = (ids, parents, names) else {
            return Err(DataFusionError::Internal(
                "stacks batch is not (u64, u64, dictionary of names)".into(),
            ));
        };
        let Some(values) = names.values().as_string_opt::<i32>() else {
            return Err(DataFusionError::Internal(
                "stack names are not a dictionary of strings".into(),
            ));
        };
        // Interned on first use: a dictionary may hold names no row uses.
        let mut interned: Vec<Option<Arc<str>>> = vec![None; values.len()];
        for ((id, parent), key) in ids
            .values()
            .iter()
            .zip(parents.values())
            .zip(names.keys().values())
        {
            if self.nodes.contains_key(id) {
                continue;
            }
            let slot = usize::try_from(*key)
                .ok()
                .and_then(|k| interned.get_mut(k))
                .ok_or_else(|| {
                    DataFusionError::Internal(format!(
                        "stack name key {key} outside its dictionary"
                    ))
                })?;
            let name = match slot {
                Some(n) => n.clone(),
                None => {
                    let n = self.name(values.value(*key as usize));
                    *slot = Some(n.clone());
                    n
                }
            };
            self.nodes.insert(*id, (*parent, name));
            self.bytes += NODE_BYTES;
        }
        Ok(())
    }

    /// The datasets whose nodes are not here.
    fn missing(&self, datasets: &[DatasetRef]) -> Vec<DatasetRef> {
        datasets
            .iter()
            .filter(|d| !self.loaded.contains(&d.key()))
            .cloned()
            .collect()
    }

    /// Bytes that merging `other` would add (an upper bound).
    fn added_bytes(&self, other: &Nodes, datasets: usize) -> usize {
        let new_nodes = other
            .nodes
            .keys()
            .filter(|id| !self.nodes.contains_key(id))
            .count();
        let new_names: usize = other
            .names
            .iter()
            .filter(|n| !self.names.contains(*n))
            .map(|n| NAME_BYTES + n.len())
            .sum();
        new_nodes * NODE_BYTES + new_names + datasets * DATASET_BYTES
    }
}

/// One tenant's nodes. A query holds the `Arc` from planning to the end, so
/// a dataset it found loaded stays whole for it even if the cache forgets
/// the tenant meanwhile.
pub type TenantNodes = Arc<RwLock<Nodes>>;

/// The tenants' dictionaries, bounded in bytes together; the least recently
/// used tenant's dictionary is forgotten first.
pub struct StackDictionary {
    tenants: Mutex<ByteLru<String, TenantNodes>>,
}

impl StackDictionary {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            tenants: Mutex::new(ByteLru::new(max_bytes)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLru<String, TenantNodes>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }

    /// The tenant's dictionary (a new empty one if it has none cached).
    pub fn tenant(&self, tenant: &str) -> TenantNodes {
        let mut tenants = self.lock();
        let key = tenant.to_string();
        if let Some(nodes) = tenants.get(&key) {
            return nodes;
        }
        let nodes = TenantNodes::default();
        tenants.insert(key, nodes.clone(), 0);
        nodes
    }

    /// The datasets whose nodes `nodes` lacks.
    pub fn missing(nodes: &TenantNodes, datasets: &[DatasetRef]) -> Vec<DatasetRef> {
        read(nodes).missing(datasets)
    }

    /// Keeps the nodes read for `datasets` in the tenant's dictionary if the
    /// budget allows; returns them to the caller otherwise.
    pub fn offer(
        &self,
        tenant: &str,
        into: &TenantNodes,
        datasets: &[DatasetRef],
        read_nodes: Nodes,
    ) -> Option<Nodes> {
        if datasets.iter().any(|d| d.tenant() != tenant) {
            // Never file one tenant's nodes under another's name.
            return Some(read_nodes);
        }
        let key = tenant.to_string();
        let is_current = |tenants: &mut ByteLru<String, TenantNodes>| {
            tenants.get(&key).is_some_and(|c| Arc::ptr_eq(&c, into))
        };
        if !is_current(&mut self.lock()) {
            // The cache forgot this tenant since the query began.
            return Some(read_nodes);
        }
        // The tenant's write lock first, the cache's lock only briefly
        // inside it: waiting for another query's readers never blocks other
        // tenants' planning.
        let mut nodes = into.write().unwrap_or_else(|e| e.into_inner());
        let new_datasets: Vec<DatasetKey> = datasets
            .iter()
            .map(DatasetRef::key)
            .filter(|k| !nodes.loaded.contains(k))
            .collect();
        let added = nodes.added_bytes(&read_nodes, new_datasets.len());
        {
            let mut tenants = self.lock();
            if !is_current(&mut tenants) || !tenants.grow(&key, added) {
                return Some(read_nodes);
            }
        }
        for (id, (parent, name)) in read_nodes.nodes {
            nodes.insert(id, parent, &name);
        }
        nodes.bytes += new_datasets.len() * DATASET_BYTES;
        nodes.loaded.extend(new_datasets);
        None
    }
}

pub fn read(nodes: &TenantNodes) -> RwLockReadGuard<'_, Nodes> {
    nodes.read().unwrap_or_else(|e| e.into_inner())
}

/// The stacks section as the dictionary reads it: names as a dictionary, so
/// a name repeated by many nodes is decoded and interned once.
fn stacks_read_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        let names = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        Arc::new(Schema::new(vec![
            Field::new("stack_id", DataType::UInt64, false),
            Field::new("parent_id", DataType::UInt64, false),
            Field::new("name", names, false),
        ]))
    })
    .clone()
}

/// The dataset's stacks section, for [`Nodes::insert_batch`].
pub async fn read_stacks_section(
    store: Arc<dyn ObjectStore>,
    d: &DatasetRef,
) -> Result<Vec<RecordBatch>> {
    let Some(section) = d.dataset.section(Section::Stacks) else {
        return Ok(Vec::new());
    };
    read_section_as(store, &d.path, section, Some(stacks_read_schema()))
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))
}
