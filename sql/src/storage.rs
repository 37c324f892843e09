//! What SQL reads: the block store (and nothing else: no local files), the
//! metastore's index, and the caches shared across queries.

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreRegistry;
use ember_metastore::Metastore;
use object_store::ObjectStore;
use url::Url;

use crate::stack_dictionary::StackDictionary;
use crate::stack_totals::TotalsCache;

/// The only object stores SQL can reach: the block store under its own URL.
/// DataFusion's default registry also serves `file://`, which would let a
/// statement read the server's files; this one serves nothing else.
#[derive(Debug)]
pub(crate) struct BlockStoreOnly {
    store: Arc<dyn ObjectStore>,
}

impl BlockStoreOnly {
    pub(crate) fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }
}

impl ObjectStoreRegistry for BlockStoreOnly {
    fn register_store(
        &self,
        _url: &Url,
        _store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        None
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        let blocks = crate::tables::store_url();
        if url.as_str().starts_with(blocks.as_str()) {
            Ok(self.store.clone())
        } else {
            Err(DataFusionError::Plan(format!(
                "no object store for {url}: SQL reads only Ember's blocks"
            )))
        }
    }
}

/// What every table and function of a session reads from.
#[derive(Clone)]
pub(crate) struct Storage {
    pub store: Arc<dyn ObjectStore>,
    pub metastore: Arc<Metastore>,
    pub stacks: Arc<StackDictionary>,
    pub totals: Arc<TotalsCache>,
}
