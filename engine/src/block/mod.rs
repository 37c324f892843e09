//! The block format: one object per block, holding a sequence of dataset
//! sections (each a Parquet file) followed by a metadata footer, the footer's
//! size and a CRC32 of it (both big-endian u32).
//!
//! A dataset is the data of one (tenant, service) in a block. The metastore
//! indexes the same metadata as the footer, so a query reads only the byte
//! ranges of the sections it needs and never the footer.

mod keyed;
mod meta;
mod reader;
mod schema;
mod writer;

pub use keyed::DatasetStrings;
pub use meta::{BlockMeta, DatasetMeta, SectionMeta, FORMAT_VERSION};
pub use reader::{read_footer, read_section, read_section_as, SectionReader};
pub use schema::{
    keyed_samples_schema, keyed_source, profiles_schema, samples_schema, stacks_schema, Section,
};
pub use writer::{block_path, write_block, EncodedBlock, StackNodes, STACK_NODES_BYTES};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error("encoding section {section}: {source}")]
    Encode {
        section: &'static str,
        source: parquet::errors::ParquetError,
    },
    #[error("building arrow batch for section {section}: {source}")]
    Arrow {
        section: &'static str,
        source: arrow::error::ArrowError,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: object_store::Error,
    },
    #[error("decoding section of {path}: {source}")]
    Decode {
        path: String,
        source: parquet::errors::ParquetError,
    },
    #[error("corrupt block {path}: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("no profiles to write")]
    Empty,
}
