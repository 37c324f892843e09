//! The embedded default object store: object_store's local file system,
//! which writes each object to a temporary file and renames it into place
//! (so a half-written block is never visible), plus the fsyncs it leaves
//! out: the file and the directories up to the root, before a PUT returns.
//! A segment writer acknowledges after its PUT, so an acknowledged profile
//! survives a power loss, not only a process crash.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

pub struct SyncedLocalStore {
    inner: Arc<LocalFileSystem>,
    root: PathBuf,
    durable_dirs: Arc<DurableDirs>,
}

/// Directories whose own entry in their parent is already on disk. Every
/// block has a directory of its own, so without this each PUT would fsync
/// the whole chain up to the root; with it, a PUT costs the file, its new
/// directory and that directory's parent.
#[derive(Debug, Default)]
struct DurableDirs(Mutex<HashSet<PathBuf>>);

/// Forgetting is always safe (it only costs an fsync), so the set is
/// cleared rather than grown without bound.
const MAX_DURABLE_DIRS: usize = 100_000;

impl DurableDirs {
    fn contains(&self, dir: &std::path::Path) -> bool {
        self.0.lock().map(|s| s.contains(dir)).unwrap_or(false)
    }

    fn clear(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.clear();
        }
    }

    fn insert(&self, dir: &std::path::Path) {
        if let Ok(mut s) = self.0.lock() {
            if s.len() >= MAX_DURABLE_DIRS {
                s.clear();
            }
            s.insert(dir.to_path_buf());
        }
    }
}

impl SyncedLocalStore {
    pub fn new(root: PathBuf) -> Result<Self> {
        Ok(Self {
            inner: Arc::new(LocalFileSystem::new_with_prefix(&root)?),
            root,
            durable_dirs: Arc::default(),
        })
    }

    /// fsyncs the object's file and the directories holding it, so that
    /// its name survives as well as its bytes.
    async fn sync(&self, location: &Path) -> Result<()> {
        sync_path(
            self.root.clone(),
            location.clone(),
            true,
            Some(self.durable_dirs.clone()),
        )
        .await
    }
}

/// Ranged reads up to this size are served on the calling thread. object_store
/// hands every read to tokio's blocking pool, and for the few dozen small
/// section reads of a flame graph that hand-off (waking pool threads, their
/// shared mutex, spawning threads in a fresh process) was most of the
/// query's context switches; a read of this size from the page cache takes
/// microseconds.
const READ_HERE_BYTES: u64 = 1 << 20;

/// The range of a ranged read small enough to serve here and with no
/// condition or version to check.
fn small_plain_range(o: &GetOptions) -> Option<Range<u64>> {
    let plain = o.if_match.is_none()
        && o.if_none_match.is_none()
        && o.if_modified_since.is_none()
        && o.if_unmodified_since.is_none()
        && o.version.is_none()
        && !o.head;
    match &o.range {
        Some(GetRange::Bounded(r))
            if plain && r.start <= r.end && r.end - r.start <= READ_HERE_BYTES =>
        {
            Some(r.clone())
        }
        _ => None,
    }
}

#[cfg(not(unix))]
fn read_range_here(_: &std::path::Path, _: &Path, _: Range<u64>) -> std::io::Result<GetResult> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(unix)]
fn read_range_here(
    root: &std::path::Path,
    location: &Path,
    range: Range<u64>,
) -> std::io::Result<GetResult> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(file_of(root, location))?;
    let meta = file.metadata()?;
    if range.end > meta.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "range past the end of the object",
        ));
    }
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start)?;
    let bytes = bytes::Bytes::from(buf);
    Ok(GetResult {
        payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(bytes) }).boxed()),
        meta: ObjectMeta {
            location: location.clone(),
            last_modified: meta.modified().map(Into::into).unwrap_or_default(),
            size: meta.len(),
            e_tag: None,
            version: None,
        },
        range,
        attributes: Default::default(),
    })
}

fn file_of(root: &std::path::Path, location: &Path) -> PathBuf {
    location
        .parts()
        .fold(root.to_path_buf(), |p, part| p.join(part.as_ref()))
}

/// fsyncs `location`'s file (if `file`) and the directories from its
/// parent up to the root: after a write, so the new name is durable; after
/// a delete, so the removal is (a dlq entry that comes back after a power
/// loss would register a block twice). With `durable`, the walk stops at
/// the first directory whose own entry is known to be on disk already.
async fn sync_path(
    root: PathBuf,
    location: Path,
    file: bool,
    durable: Option<Arc<DurableDirs>>,
) -> Result<()> {
    let path = file_of(&root, &location);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if file {
            std::fs::File::open(&path)?.sync_all()?;
        }
        let mut dir = path.parent();
        let mut child: Option<&std::path::Path> = None;
        while let Some(d) = dir {
            match std::fs::File::open(d) {
                Ok(f) => f.sync_all()?,
                // Emptied directories may be gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // `d` is synced, so the entry of the directory below it is on disk.
            if let (Some(k), Some(c)) = (&durable, child) {
                k.insert(c);
            }
            if d == root || durable.as_ref().is_some_and(|k| k.contains(d)) {
                break;
            }
            child = Some(d);
            dir = d.parent();
        }
        Ok(())
    })
    .await
    .map_err(|e| generic(e.to_string()))?
    .map_err(|e| generic(format!("fsync of {location}: {e}")))
}

#[derive(Debug)]
struct SyncedUpload {
    inner: Box<dyn MultipartUpload>,
    root: PathBuf,
    location: Path,
    durable: Arc<DurableDirs>,
}

#[async_trait]
impl MultipartUpload for SyncedUpload {
    fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let result = self.inner.complete().await?;
        sync_path(
            self.root.clone(),
            self.location.clone(),
            true,
            Some(self.durable.clone()),
        )
        .await?;
        Ok(result)
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
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
        match self.inner.put_opts(location, payload, opts).await {
            Ok(result) => {
                self.sync(location).await?;
                Ok(result)
            }
            // An earlier PUT of this object may have linked it and failed
            // (or been dropped) before its fsync: sync it before saying it
            // exists, so a caller that takes it as its own is not told a
            // durable lie.
            Err(e @ object_store::Error::AlreadyExists { .. }) => {
                self.sync(location).await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // Compaction uploads large blocks in parts: the whole object is
        // synced once it is complete, as a PUT is.
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(SyncedUpload {
            inner,
            root: self.root.clone(),
            location: location.clone(),
            durable: self.durable_dirs.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if let Some(range) = small_plain_range(&options) {
            // A file missing under this mapping of the path falls through to
            // object_store's reader, which says what is missing.
            if let Ok(got) = read_range_here(&self.root, location, range) {
                return Ok(got);
            }
        }
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
        // A delete may take emptied directories with it; a directory made
        // again later must be synced again.
        let durable = self.durable_dirs.clone();
        self.inner
            .delete_stream(locations)
            .then(move |deleted| {
                let root = root.clone();
                durable.clear();
                async move {
                    let path = deleted?;
                    sync_path(root, path.clone(), false, None).await?;
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
        sync_path(self.root.clone(), from.clone(), false, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn small_ranges_read_here_are_the_bytes_object_store_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = SyncedLocalStore::new(dir.path().to_path_buf()).unwrap();
        let path = Path::from("blocks/1/t/block.bin");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        store
            .put(&path, PutPayload::from(bytes.clone()))
            .await
            .unwrap();
        let here = store.get_range(&path, 100..2100).await.unwrap();
        assert_eq!(here.as_ref(), &bytes[100..2100]);
        let options = GetOptions {
            range: Some(GetRange::Bounded(100..2100)),
            ..Default::default()
        };
        assert!(read_range_here(dir.path(), &path, 100..2100).is_ok());
        let got = store.get_opts(&path, options).await.unwrap();
        assert_eq!((got.range.clone(), got.meta.size), (100..2100, 3000));
        assert_eq!(got.bytes().await.unwrap().as_ref(), &bytes[100..2100]);
        // Past the end, and a missing object: what object_store answers.
        let past = store
            .get_range(&path, 2900..3100)
            .await
            .map_err(|e| e.to_string());
        let inner = store
            .inner
            .get_range(&path, 2900..3100)
            .await
            .map_err(|e| e.to_string());
        assert_eq!(past, inner);
        let missing = store.get_range(&Path::from("blocks/none"), 0..10).await;
        assert!(matches!(missing, Err(object_store::Error::NotFound { .. })));
    }
}
