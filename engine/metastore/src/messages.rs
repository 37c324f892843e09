//! The metastore's messages, from `proto/ember/metastore/v1/metastore.proto`:
//! its commands, compaction jobs, snapshot and network bodies.

include!(concat!(env!("OUT_DIR"), "/ember.metastore.v1.rs"));
