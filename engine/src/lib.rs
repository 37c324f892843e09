//! What every role shares: the profile model, the block format that segment
//! writers flush to object storage and the metastore indexes
//! (`engine/metastore`), label selectors, tenants and credentials.

pub mod auth;
pub mod block;
pub mod cluster_call;
pub mod local_store;
pub mod object_requests;
pub mod object_store_url;
pub mod profile;
pub mod selector;
pub mod stack;
pub mod store_layer;
pub mod tenant;

pub use auth::{AuthError, Authenticator};
pub use block::{BlockMeta, DatasetMeta, SectionMeta};
pub use profile::{Labels, Profile, Sample, Stack, Stacks};
pub use tenant::{TenantId, DEFAULT_TENANT};
