//! # Layout
//! - [`metrics`]: the Prometheus metrics of every role, in one registry per process.
//! - [`http`]: the ops endpoint: `/metrics`, `/healthz` (liveness), `/readyz` (readiness of the real
//!   dependencies).
//! - [`trace`]: tracing setup with optional OTLP export, and W3C trace-context propagation through bus
//!   headers so one trace follows a message across processes.
#![warn(missing_docs)]

pub mod http;
pub mod metrics;
pub mod trace;

pub use metrics::Metrics;
