//! Pyroscope's public API and pprof's profile, generated from the `.proto`
//! files in `proto/` (exact packages, names and field numbers of
//! grafana/pyroscope's `api/` and pprof's profile.proto), with the proto3
//! JSON mapping Connect clients use for `application/json`; and how they
//! ride HTTP: Connect errors (`connect`) and gRPC framing on the same port
//! (`grpc`).

pub mod connect;
mod flame_graph;
pub mod grpc;
pub mod json;

macro_rules! package {
    ($file:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $file, ".rs"));
        include!(concat!(env!("OUT_DIR"), "/", $file, ".serde.rs"));
    };
}

/// pprof's profile, as Pyroscope names its package.
pub mod google {
    pub mod v1 {
        package!("google.v1");
    }
}

pub mod types {
    pub mod v1 {
        package!("types.v1");
    }
}

pub mod querier {
    pub mod v1 {
        package!("querier.v1");
    }
}

pub mod push {
    pub mod v1 {
        package!("push.v1");
    }
}

#[cfg(test)]
mod tests;
