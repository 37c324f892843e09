//! Ember's storage engine: the profile model every role shares, the block
//! format that segment writers flush to object storage, the metastore that
//! indexes every block, and label selectors used to prune them.

pub mod block;
pub mod metastore;
pub mod profile;
pub mod selector;
pub mod stack;

pub use block::{BlockMeta, DatasetMeta, SectionMeta};
pub use metastore::{BlockQuery, Command, DatasetRef, Metastore, MetastoreError};
pub use profile::{Labels, Profile, Sample};
