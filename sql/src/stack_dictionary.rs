//! Every stack node the query backend has read, by its global id. Node ids
//! are hashes of the path, the same in every block, so blocks share their
//! nodes: a flame graph reads the stacks sections only of the datasets whose
//! nodes are not here yet, and a warm query reads none.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use ember_engine::DatasetRef;

/// Node id -> (parent id, frame name).
pub type StackNodes = HashMap<u64, (u64, Arc<str>)>;

/// Identifies a dataset: its block and service.
type DatasetKey = (Arc<str>, String);

fn key(d: &DatasetRef) -> DatasetKey {
    (d.block_id.clone(), d.dataset.service_name.clone())
}

#[derive(Default)]
pub struct Nodes {
    nodes: StackNodes,
    names: HashSet<Arc<str>>,
    loaded: HashSet<DatasetKey>,
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

    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    pub fn insert(&mut self, id: u64, parent: u64, name: &str) {
        if !self.nodes.contains_key(&id) {
            let name = self.name(name);
            self.nodes.insert(id, (parent, name));
        }
    }
}

/// Grows until `max_nodes`, then stops caching: nodes are never evicted,
/// so a dataset once marked loaded stays whole for every later query.
pub struct StackDictionary {
    inner: RwLock<Nodes>,
    max_nodes: usize,
}

impl StackDictionary {
    pub fn new(max_nodes: usize) -> Self {
        Self {
            inner: RwLock::new(Nodes::default()),
            max_nodes,
        }
    }

    /// The datasets whose nodes are not in the dictionary.
    pub fn missing(&self, datasets: &[DatasetRef]) -> Vec<DatasetRef> {
        let inner = self.read();
        datasets
            .iter()
            .filter(|d| !inner.loaded.contains(&key(d)))
            .cloned()
            .collect()
    }

    /// Keeps the nodes read for `datasets` if there is room; returns them
    /// to the caller otherwise.
    pub fn offer(&self, datasets: &[DatasetRef], nodes: Nodes) -> Option<Nodes> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.len() + nodes.len() > self.max_nodes {
            return Some(nodes);
        }
        for (id, (parent, name)) in nodes.nodes {
            inner.insert(id, parent, &name);
        }
        inner.loaded.extend(datasets.iter().map(key));
        None
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Nodes> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}
