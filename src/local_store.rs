//! The embedded default object store: object_store's local file system,
//! which writes each object to a temporary file and renames it into place
//! (so a half-written block is never visible), plus the fsyncs it leaves
//! out: the file and every directory up to the root, before a PUT returns.
//! A segment writer acknowledges after its PUT, so an acknowledged profile
//! survives a power loss, not only a process crash.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

pub struct SyncedLocalStore {
    inner: Arc<LocalFileSystem>,
    root: PathBuf,
}

impl SyncedLocalStore {
    pub fn new(root: PathBuf) -> Result<Self> {
        Ok(Self {
            inner: Arc::new(LocalFileSystem::new_with_prefix(&root)?),
            root,
        })
    }

    /// fsyncs the object's file and the directories holding it, so that
    /// its name survives as well as its bytes.
    async fn sync(&self, location: &Path) -> Result<()> {
        sync_path(self.root.clone(), location.clone(), true).await
    }
}

fn file_of(root: &std::path::Path, location: &Path) -> PathBuf {
    location
        .parts()
        .fold(root.to_path_buf(), |p, part| p.join(part.as_ref()))
}

/// fsyncs `location`'s file (if `file`) and every directory from its
/// parent up to the root: after a write, so the new name is durable; after
/// a delete, so the removal is (a dlq entry that comes back after a power
/// loss would register a block twice).
async fn sync_path(root: PathBuf, location: Path, file: bool) -> Result<()> {
    let path = file_of(&root, &location);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if file {
            std::fs::File::open(&path)?.sync_all()?;
        }
        let mut dir = path.parent();
        while let Some(d) = dir {
            match std::fs::File::open(d) {
                Ok(f) => f.sync_all()?,
                // Emptied directories may be gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if d == root {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    })
    .await
    .map_err(|e| generic(e.to_string()))?
    .map_err(|e| generic(format!("fsync of {location}: {e}")))
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "SyncedLocalStore",
        source: message.into(),
    }
}

impl fmt::Display for SyncedLocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Synced({})", self.inner)
    }
}

impl fmt::Debug for SyncedLocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Synced({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for SyncedLocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.sync(location).await?;
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // Blocks are written with one PUT; multipart is for tools.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let root = self.root.clone();
        self.inner
            .delete_stream(locations)
            .then(move |deleted| {
                let root = root.clone();
                async move {
                    let path = deleted?;
                    sync_path(root, path.clone(), false).await?;
                    Ok(path)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.sync(to).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await?;
        self.sync(to).await?;
        sync_path(self.root.clone(), from.clone(), false).await
    }
}
