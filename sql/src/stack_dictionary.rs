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
use ember_engine::stack::ROOT;
use ember_metastore::{DatasetKey, DatasetRef};
use object_store::ObjectStore;

use crate::lru::ByteLru;

/// Bytes a node costs (its id, slot, and the id's index entry with
/// hashing slack).
const NODE_BYTES: usize = 48;
/// Bytes a distinct name costs besides its text (its shared header, its
/// place in the list and in the index).
const NAME_BYTES: usize = 64;
const DATASET_BYTES: usize = 96;

/// The name of a slot whose node is not known yet (only named as a parent).
const UNNAMED: u32 = u32::MAX;

/// A node by slot: its parent's slot and its name's index. A flame graph
/// hashes a leaf's id once, then walks up the stack by array index.
#[derive(Clone, Copy)]
struct Slot {
    id: u64,
    parent: u32,
    name: u32,
}

/// Stack nodes by id, each in a dense slot; slot 0 is the root. Names are
/// interned: one copy of each distinct name.
pub struct Nodes {
    /// Node id -> slot. Hashed with foldhash: a flame graph looks up every
    /// leaf here, and SipHash was most of that cost.
    slot_of: foldhash::HashMap<u64, u32>,
    slots: Vec<Slot>,
    names: Vec<Arc<str>>,
    name_of: foldhash::HashMap<Arc<str>, u32>,
    known: usize,
    loaded: HashSet<DatasetKey>,
    bytes: usize,
}

impl Default for Nodes {
    fn default() -> Self {
        let mut slot_of = foldhash::HashMap::default();
        slot_of.insert(ROOT, ROOT_SLOT);
        Self {
            slot_of,
            slots: vec![Slot {
                id: ROOT,
                parent: ROOT_SLOT,
                name: UNNAMED,
            }],
            names: Vec::new(),
            name_of: Default::default(),
            known: 0,
            loaded: HashSet::new(),
            bytes: 0,
        }
    }
}

/// The root's slot in every dictionary.
pub const ROOT_SLOT: u32 = 0;

impl Nodes {
    /// A node's parent id and name.
    pub fn get(&self, id: u64) -> Option<(u64, &str)> {
        let (parent, _, name) = self.node(*self.slot_of.get(&id)?)?;
        Some((self.slots[parent as usize].id, name))
    }

    /// The slot of the node `id` (known or only named as a parent).
    pub fn slot(&self, id: u64) -> Option<u32> {
        self.slot_of.get(&id).copied()
    }

    /// The node in `slot`: its parent's slot, its name's index and its
    /// name; `None` when the node is only known as a parent, or `slot` is
    /// out of range.
    pub fn node(&self, slot: u32) -> Option<(u32, u32, &str)> {
        let s = self.slots.get(slot as usize)?;
        let name = self.names.get(s.name as usize)?;
        Some((s.parent, s.name, name))
    }

    /// Slots are below this.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Name indices are below this.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// The index of the name `text`.
    pub fn name_index(&self, text: &str) -> Option<u32> {
        self.name_of.get(text).copied()
    }

    /// The id of the node in `slot` (the root's for a slot out of range).
    pub fn id(&self, slot: u32) -> u64 {
        self.slots.get(slot as usize).map_or(ROOT, |s| s.id)
    }

    /// Nodes known by name (not counting those only named as parents).
    pub fn len(&self) -> usize {
        self.known
    }

    pub fn is_empty(&self) -> bool {
        self.known == 0
    }

    /// Approximate memory held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn name(&mut self, name: &str) -> u32 {
        if let Some(&n) = self.name_of.get(name) {
            return n;
        }
        let n = self.names.len() as u32;
        let text: Arc<str> = Arc::from(name);
        self.names.push(text.clone());
        self.name_of.insert(text, n);
        self.bytes += NAME_BYTES + name.len();
        n
    }

    /// The slot of `id`, made (unnamed) if it has none.
    fn slot_or_new(&mut self, id: u64) -> u32 {
        let next = self.slots.len() as u32;
        let slot = *self.slot_of.entry(id).or_insert(next);
        if slot == next {
            self.slots.push(Slot {
                id,
                parent: ROOT_SLOT,
                name: UNNAMED,
            });
            self.bytes += NODE_BYTES;
        }
        slot
    }

    fn is_named(&self, id: u64) -> bool {
        self.slot(id)
            .is_some_and(|s| self.slots[s as usize].name != UNNAMED)
    }

    /// Names the node in `slot` (a no-op if it is named already).
    fn name_slot(&mut self, slot: u32, parent: u64, name: u32) {
        if self.slots[slot as usize].name != UNNAMED {
            return;
        }
        let parent = self.slot_or_new(parent);
        let s = &mut self.slots[slot as usize];
        (s.parent, s.name) = (parent, name);
        self.known += 1;
    }

    pub fn insert(&mut self, id: u64, parent: u64, name: &str) {
        if !self.is_named(id) {
            let slot = self.slot_or_new(id);
            let name = self.name(name);
            self.name_slot(slot, parent, name);
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
        // Slots are u32: a dictionary this large is far past any memory budget.
        if self.slots.len() + 2 * ids.len() >= UNNAMED as usize {
            return Err(DataFusionError::ResourcesExhausted(
                "more than 2^31 stack nodes".into(),
            ));
        }
        // Interned on first use: a dictionary may hold names no row uses.
        let mut interned: Vec<Option<u32>> = vec![None; values.len()];
        for ((id, parent), key) in ids
            .values()
            .iter()
            .zip(parents.values())
            .zip(names.keys().values())
        {
            if self.is_named(*id) {
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
                Some(n) => *n,
                None => {
                    let n = self.name(values.value(*key as usize));
                    *slot = Some(n);
                    n
                }
            };
            let slot = self.slot_or_new(*id);
            self.name_slot(slot, *parent, name);
        }
        Ok(())
    }

    /// Adds `other`'s nodes. Into an empty dictionary (a tenant's first
    /// query after a start) they move whole instead of being hashed again.
    fn merge(&mut self, other: Nodes) {
        if self.slots.len() == 1 {
            let (loaded, bytes) = (std::mem::take(&mut self.loaded), self.bytes);
            *self = other;
            self.loaded.extend(loaded);
            self.bytes += bytes;
            return;
        }
        for s in &other.slots {
            let Some(name) = other.names.get(s.name as usize) else {
                continue;
            };
            self.insert(s.id, other.id(s.parent), name);
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
            .slots
            .iter()
            .filter(|s| !self.slot_of.contains_key(&s.id))
            .count();
        let new_names: usize = other
            .names
            .iter()
            .filter(|n| !self.name_of.contains_key(*n))
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
    S.get_or_init(|| Section::Stacks.schema_with_dictionaries(&["name"]))
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
    fn a_node_named_before_its_parent_finds_it_once_it_comes() {
        let mut nodes = Nodes::default();
        nodes.insert(2, 1, "work");
        assert_eq!(
            (nodes.len(), nodes.get(2), nodes.get(1)),
            (1, Some((1, "work")), None)
        );
        nodes.insert(1, 0, "main");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes.get(1), Some((0, "main")));
        let work = nodes.slot(2).unwrap();
        let (parent, _, _) = nodes.node(work).unwrap();
        assert_eq!(nodes.id(parent), 1);
        // Node 1's slot was made when node 2 named it: two nodes, two slots.
        assert_eq!(nodes.bytes(), 2 * NODE_BYTES + 2 * NAME_BYTES + 8);
    }

    #[test]
    fn a_batch_with_names_not_as_a_dictionary_is_an_error() {
        let names = StringArray::from(vec!["a", "b", "c", "a"]);
        let err = Nodes::default().insert_batch(&batch(Arc::new(names)));
        assert!(err.is_err());
    }
}
