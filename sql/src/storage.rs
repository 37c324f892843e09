//! What SQL reads: the block store (and nothing else: no local files), the
//! metastore's index, and the caches shared across queries.

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreRegistry;
use ember_metastore::{MetastoreError, MetastoreIndex};
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
    pub index: Arc<dyn MetastoreIndex>,
    pub stacks: Arc<StackDictionary>,
    pub totals: Arc<TotalsCache>,
}

/// An index that could not answer, as the error a query fails with: the
/// client may retry (503, gRPC UNAVAILABLE).
pub(crate) fn index_error(e: MetastoreError) -> DataFusionError {
    DataFusionError::External(Box::new(crate::SqlError::Unavailable(e.to_string())))
}

/// The index's answer where DataFusion asks for it synchronously (a table
/// function's columns can depend on it). Planning runs on the query threads,
/// one of which may block meanwhile.
pub(crate) fn index_answer<T>(read: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let handle = Handle::try_current().map_err(|e| DataFusionError::Internal(e.to_string()))?;
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return Err(DataFusionError::Internal(
            "a table function read the index outside the query threads".into(),
        ));
    }
    tokio::task::block_in_place(|| handle.block_on(read))
}
