//! One way to wrap an object store: a [`StoreLayer`] sees each request
//! before [`Layered`] forwards it to the store beneath, and may delay or
//! refuse it. Counting requests for metrics and injecting faults in tests
//! are layers; nothing else re-implements the whole `ObjectStore` trait
//! to add a line before each call.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// A request as a layer sees it, before it is forwarded.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Put {
        location: &'a Path,
        bytes: usize,
    },
    PutMultipart {
        location: &'a Path,
    },
    Get {
        location: &'a Path,
        head: bool,
    },
    /// One request per range on a real object store.
    GetRanges {
        location: &'a Path,
        ranges: &'a [Range<u64>],
    },
    Delete,
    List,
    Copy {
        from: &'a Path,
        to: &'a Path,
    },
    Rename {
        from: &'a Path,
        to: &'a Path,
    },
}

/// What a wrapper adds around the requests it forwards.
#[async_trait]
pub trait StoreLayer: Send + Sync + 'static {
    /// Named in the wrapped store's `Display`: `name(inner)`.
    fn name(&self) -> &'static str;

    /// Sees every request, before it is forwarded.
    fn saw(&self, _request: &Request<'_>) {}

    /// May delay or refuse a request with an answer to wait for (every
    /// one but `Delete` and `List`, which stream), after [`Self::saw`].
    async fn admit(&self, _request: &Request<'_>) -> Result<()> {
        Ok(())
    }

    /// Bytes a GET returned.
    fn read(&self, _bytes: u64) {}
}

/// `inner` with `layer` around each request.
pub struct Layered<L> {
    inner: Arc<dyn ObjectStore>,
    layer: L,
}

impl<L: StoreLayer> Layered<L> {
    pub fn new(inner: Arc<dyn ObjectStore>, layer: L) -> Self {
        Self { inner, layer }
    }

    async fn admitted(&self, request: Request<'_>) -> Result<()> {
        self.layer.saw(&request);
        self.layer.admit(&request).await
    }
}

impl<L: StoreLayer> fmt::Display for Layered<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.layer.name(), self.inner)
    }
}

impl<L: StoreLayer> fmt::Debug for Layered<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:?})", self.layer.name(), self.inner)
    }
}

#[async_trait]
impl<L: StoreLayer> ObjectStore for Layered<L> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let bytes = payload.content_length();
        self.admitted(Request::Put { location, bytes }).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.admitted(Request::PutMultipart { location }).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        self.admitted(Request::Get { location, head }).await?;
        let result = self.inner.get_opts(location, options).await?;
        if !head {
            self.layer
                .read(result.range.end.saturating_sub(result.range.start));
        }
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.admitted(Request::GetRanges { location, ranges })
            .await?;
        let read = ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum();
        let result = self.inner.get_ranges(location, ranges).await?;
        self.layer.read(read);
        Ok(result)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.layer.saw(&Request::Delete);
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.layer.saw(&Request::List);
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.admitted(Request::List).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.admitted(Request::Copy { from, to }).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.admitted(Request::Rename { from, to }).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    use super::*;

    /// Records what it saw and read; refuses puts under `refused/`.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<String>>,
        read: Mutex<u64>,
    }

    #[async_trait]
    impl StoreLayer for Recorder {
        fn name(&self) -> &'static str {
            "Recorder"
        }

        fn saw(&self, request: &Request<'_>) {
            let name = match request {
                Request::Put { bytes, .. } => format!("put {bytes}"),
                Request::Get { head, .. } => format!("get head={head}"),
                Request::GetRanges { ranges, .. } => format!("ranges {}", ranges.len()),
                other => format!("{other:?}"),
            };
            self.seen.lock().unwrap().push(name);
        }

        async fn admit(&self, request: &Request<'_>) -> Result<()> {
            match request {
                Request::Put { location, .. } if location.as_ref().starts_with("refused/") => {
                    Err(object_store::Error::Generic {
                        store: "Recorder",
                        source: "refused".into(),
                    })
                }
                _ => Ok(()),
            }
        }

        fn read(&self, bytes: u64) {
            *self.read.lock().unwrap() += bytes;
        }
    }

    #[tokio::test]
    async fn each_request_is_seen_then_forwarded_unless_refused() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = Layered::new(inner.clone(), Recorder::default());
        let path = Path::from("a/b");
        store.put(&path, PutPayload::from("hello")).await.unwrap();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"hello");
        let ranges = store.get_ranges(&path, &[0..2, 3..5]).await.unwrap();
        assert_eq!(ranges, vec![Bytes::from("he"), Bytes::from("lo")]);
        let refused = Path::from("refused/x");
        assert!(store.put(&refused, PutPayload::from("x")).await.is_err());
        assert!(
            inner.head(&refused).await.is_err(),
            "a refused put is not forwarded"
        );

        let layer = &store.layer;
        assert_eq!(
            *layer.seen.lock().unwrap(),
            ["put 5", "get head=false", "ranges 2", "put 1"]
        );
        assert_eq!(*layer.read.lock().unwrap(), 5 + 4);
        assert_eq!(store.to_string(), format!("Recorder({inner})"));
    }
}
