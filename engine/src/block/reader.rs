//! Reads sections of block objects with ranged GETs.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::RecordBatch;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use super::meta::{BlockMeta, SectionMeta};
use super::BlockError;

/// A Parquet file that is a byte range of a block object. Offsets asked by
/// the Parquet reader are relative to the section.
#[derive(Clone)]
pub struct SectionReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    offset: u64,
    size: u64,
}

impl SectionReader {
    pub fn new(store: Arc<dyn ObjectStore>, path: &str, section: &SectionMeta) -> Self {
        Self {
            store,
            path: Path::from(path),
            offset: section.offset,
            size: section.size,
        }
    }

    fn absolute(&self, range: Range<u64>) -> parquet::errors::Result<Range<u64>> {
        if range.end > self.size || range.start > range.end {
            return Err(ParquetError::General(format!(
                "range {range:?} outside section of {} bytes in {}",
                self.size, self.path
            )));
        }
        Ok(self.offset + range.start..self.offset + range.end)
    }

    fn cache_key(&self) -> (String, u64) {
        (self.path.to_string(), self.offset)
    }
}

fn object_err(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for SectionReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let range = self.absolute(range)?;
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(object_err)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            let ranges = ranges
                .into_iter()
                .map(|r| self.absolute(r))
                .collect::<Result<Vec<_>, _>>()?;
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(object_err)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let key = self.cache_key();
            if let Some(m) = footer_cache().get(&key) {
                return Ok(m);
            }
            let size = self.size;
            let meta = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 * 1024))
                .load_and_finish(&mut *self, size)
                .await?;
            let meta = Arc::new(meta);
            footer_cache().insert(key, meta.clone());
            Ok(meta)
        }
        .boxed()
    }
}

/// Parquet footers of sections already read, so that a warm query reads only
/// column chunks. Blocks are immutable, so entries never go stale; the cache
/// is bounded by dropping everything when full.
struct FooterCache {
    entries: Mutex<HashMap<(String, u64), Arc<ParquetMetaData>>>,
}

const FOOTER_CACHE_ENTRIES: usize = 100_000;

impl FooterCache {
    fn get(&self, key: &(String, u64)) -> Option<Arc<ParquetMetaData>> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    fn insert(&self, key: (String, u64), meta: Arc<ParquetMetaData>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= FOOTER_CACHE_ENTRIES {
                entries.clear();
            }
            entries.insert(key, meta);
        }
    }
}

fn footer_cache() -> &'static FooterCache {
    static CACHE: OnceLock<FooterCache> = OnceLock::new();
    CACHE.get_or_init(|| FooterCache {
        entries: Mutex::new(HashMap::new()),
    })
}

/// Reads a whole section into memory (compaction, tests, tools).
pub async fn read_section(
    store: Arc<dyn ObjectStore>,
    path: &str,
    section: &SectionMeta,
) -> Result<Vec<RecordBatch>, BlockError> {
    let decode = |source| BlockError::Decode {
        path: path.to_string(),
        source,
    };
    let reader = SectionReader::new(store, path, section);
    let stream = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(decode)?
        .build()
        .map_err(decode)?;
    stream.try_collect().await.map_err(decode)
}

/// Reads and checks the metadata footer of a block object.
pub async fn read_footer(store: &dyn ObjectStore, path: &str) -> Result<BlockMeta, BlockError> {
    let location = Path::from(path);
    let read = |source| BlockError::Read {
        path: path.to_string(),
        source,
    };
    let corrupt = |reason: String| BlockError::Corrupt {
        path: path.to_string(),
        reason,
    };
    let size = store.head(&location).await.map_err(read)?.size;
    if size < 8 {
        return Err(corrupt(format!("{size} bytes is too small for a footer")));
    }
    let tail = store
        .get_range(&location, size - 8..size)
        .await
        .map_err(read)?;
    let footer_len = u64::from(u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]));
    let crc = u32::from_be_bytes([tail[4], tail[5], tail[6], tail[7]]);
    if footer_len + 8 > size {
        return Err(corrupt(format!("footer of {footer_len} bytes in {size}")));
    }
    let footer = store
        .get_range(&location, size - 8 - footer_len..size - 8)
        .await
        .map_err(read)?;
    if crc32fast::hash(&footer) != crc {
        return Err(corrupt("footer CRC mismatch".into()));
    }
    let meta = BlockMeta::decode_from(&footer).map_err(|e| corrupt(e.to_string()))?;
    Ok(BlockMeta { size, ..meta })
}
