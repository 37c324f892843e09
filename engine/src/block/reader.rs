//! Reads sections of block objects with ranged GETs.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
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

/// A section up to this size whose footer is not cached yet is read whole,
/// in one GET: reading its footer, its page index and then its columns
/// costs three round trips to a cloud bucket (30 ms each in its region),
/// more than fetching 4 MiB once (20-40 ms at one connection's speed).
const WHOLE_SECTION_BYTES: u64 = 4 << 20;

/// A Parquet file that is a byte range of a block object. Offsets asked by
/// the Parquet reader are relative to the section.
#[derive(Clone)]
pub struct SectionReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    offset: u64,
    size: u64,
    /// The whole section, once read whole.
    whole: Option<Bytes>,
}

impl SectionReader {
    pub fn new(store: Arc<dyn ObjectStore>, path: &str, section: &SectionMeta) -> Self {
        Self {
            store,
            path: Path::from(path),
            offset: section.offset,
            size: section.size,
            whole: None,
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

    /// `range` within the section, as a range of `usize` for slicing.
    fn relative(&self, range: Range<u64>) -> parquet::errors::Result<Range<usize>> {
        self.absolute(range.clone())?;
        Ok(range.start as usize..range.end as usize)
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
            if let Some(whole) = &self.whole {
                return Ok(whole.slice(self.relative(range)?));
            }
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
            if let Some(whole) = &self.whole {
                return ranges
                    .into_iter()
                    .map(|r| Ok(whole.slice(self.relative(r)?)))
                    .collect();
            }
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
            let meta = if size <= WHOLE_SECTION_BYTES {
                let whole = self
                    .store
                    .get_range(&self.path, self.absolute(0..size)?)
                    .await
                    .map_err(object_err)?;
                let meta = ParquetMetaDataReader::new().parse_and_finish(&whole)?;
                self.whole = Some(whole);
                meta
            } else {
                ParquetMetaDataReader::new()
                    .with_prefetch_hint(Some(64 * 1024))
                    .load_and_finish(&mut *self, size)
                    .await?
            };
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
    read_section_as(store, path, section, None).await
}

/// Reads a whole section into memory, its columns decoded as the Arrow types
/// of `schema` when given: a repeated string column read as a dictionary
/// costs its distinct values once instead of one copy per row.
pub async fn read_section_as(
    store: Arc<dyn ObjectStore>,
    path: &str,
    section: &SectionMeta,
    schema: Option<SchemaRef>,
) -> Result<Vec<RecordBatch>, BlockError> {
    let decode = |source| BlockError::Decode {
        path: path.to_string(),
        source,
    };
    let reader = SectionReader::new(store, path, section);
    let mut options = ArrowReaderOptions::new();
    if let Some(schema) = schema {
        options = options.with_schema(schema);
    }
    let stream = ParquetRecordBatchStreamBuilder::new_with_options(reader, options)
        .await
        .map_err(decode)?
        .with_batch_size(SECTION_BATCH_ROWS)
        .build()
        .map_err(decode)?;
    stream.try_collect().await.map_err(decode)
}

/// Rows per batch of a section read whole: the section is in memory
/// anyway, and fewer batches mean fewer dictionaries to walk.
const SECTION_BATCH_ROWS: usize = 64 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use object_store::memory::InMemory;
    use object_store::PutPayload;
    use parquet::arrow::ArrowWriter;

    /// An object holding 100 bytes of something else, then a Parquet file.
    /// `path` differs per test: footers are cached process-wide by path.
    async fn object_with_section(
        path: &str,
        rows: i64,
    ) -> (Arc<dyn ObjectStore>, SectionMeta, RecordBatch) {
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from_iter_values(0..rows)) as _),
            (
                "name",
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("f{i}")),
                )) as _,
            ),
        ])
        .unwrap();
        let mut file = vec![7u8; 100];
        let mut writer = ArrowWriter::try_new(&mut file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let size = file.len() as u64 - 100;
        store
            .put(&Path::from(path), PutPayload::from(file))
            .await
            .unwrap();
        let section = SectionMeta {
            kind: "test".into(),
            offset: 100,
            size,
            rows: rows as u64,
            keyed: false,
        };
        (store, section, batch)
    }

    #[tokio::test]
    async fn a_small_section_is_read_with_one_get_then_from_memory() {
        let (store, section, want) = object_with_section("one-get", 1000).await;
        let mut reader = SectionReader::new(store.clone(), "one-get", &section);
        reader.get_metadata(None).await.unwrap();
        assert!(reader.whole.is_some(), "a small section is read whole");
        // Gone from the store: every later read must come from memory.
        store.delete(&Path::from("one-get")).await.unwrap();
        let got: Vec<RecordBatch> = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .unwrap()
            .build()
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got, vec![want]);
    }

    #[tokio::test]
    async fn reads_outside_the_section_are_refused() {
        let (store, section, _) = object_with_section("outside", 10).await;
        let mut reader = SectionReader::new(store, "outside", &section);
        reader.get_metadata(None).await.unwrap();
        assert!(reader.get_bytes(0..section.size + 1).await.is_err());
        assert!(reader.get_bytes(0..section.size).await.is_ok());
    }
}
