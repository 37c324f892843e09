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
use datafusion::arrow::datatypes::{Int32Type, SchemaRef, UInt64Type};
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

    /// Adds `other`'s nodes. Into an empty dictionary (a tenant's first
    /// query after a start) they move whole instead of being hashed again.
    fn merge(&mut self, other: Nodes) {
        if self.nodes.is_empty() {
            self.nodes = other.nodes;
            self.names = other.names;
            self.bytes += other.bytes;
            return;
        }
        for (id, (parent, name)) in other.nodes {
            self.insert(id, parent, &name);
        }
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
        nodes.merge(read_nodes);
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
    S.get_or_init(|| Section::Stacks.schema_with_dictionary("name"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{DictionaryArray, StringArray, UInt64Array};

    fn batch(names: Arc<dyn Array>) -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "stack_id",
                Arc::new(UInt64Array::from(vec![1, 2, 3, 1])) as _,
            ),
            (
                "parent_id",
                Arc::new(UInt64Array::from(vec![0, 1, 2, 0])) as _,
            ),
            ("name", names),
        ])
        .unwrap()
    }

    #[test]
    fn a_batch_of_nodes_interns_each_used_name_once() {
        let names: DictionaryArray<Int32Type> =
            vec!["main", "work", "main", "again"].into_iter().collect();
        // Keys 0, 1, 0, 2: "again" is only on the repeated node 1.
        let mut nodes = Nodes::default();
        nodes.insert_batch(&batch(Arc::new(names))).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes.get(1), Some((0, "main")));
        assert_eq!(nodes.get(2), Some((1, "work")));
        assert_eq!(nodes.get(3), Some((2, "main")));
        let main = |id| nodes.get(id).unwrap().1.as_ptr();
        assert_eq!(main(1), main(3), "one name, one copy");
        // Three nodes, and the names "main" and "work": the first node with
        // an id wins, so "again" was never interned.
        assert_eq!(nodes.bytes(), 3 * NODE_BYTES + 2 * NAME_BYTES + 8);
    }

    #[test]
    fn merging_moves_into_an_empty_dictionary_and_adds_to_a_full_one() {
        let read = || {
            let mut n = Nodes::default();
            n.insert(1, 0, "main");
            n.insert(2, 1, "work");
            n
        };
        let mut empty = Nodes::default();
        empty.merge(read());
        assert_eq!((empty.len(), empty.bytes()), (2, read().bytes()));
        assert_eq!(empty.get(2), Some((1, "work")));

        let mut full = Nodes::default();
        full.insert(1, 0, "main");
        full.insert(7, 0, "gc");
        let before = full.bytes();
        full.merge(read());
        assert_eq!(full.len(), 3);
        assert_eq!(full.get(2), Some((1, "work")));
        assert_eq!(full.get(7), Some((0, "gc")));
        // Only node 2 and the name "work" are new.
        assert_eq!(full.bytes(), before + NODE_BYTES + NAME_BYTES + 4);
    }

    #[test]
    fn a_batch_with_names_not_as_a_dictionary_is_an_error() {
        let names = StringArray::from(vec!["a", "b", "c", "a"]);
        let err = Nodes::default().insert_batch(&batch(Arc::new(names)));
        assert!(err.is_err());
    }
}
