//! The integration test binary: the conformance suite and one module per backend that runs it.

mod conformance;
mod embedded;
mod leases;
mod list_cache;
mod presence;
mod redis_seq;
mod scylla;
