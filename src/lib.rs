//! taskgate: a sidecar reverse proxy in front of a vendor's task-update API.
//!
//! # Layout
//!
//! - [`cli`]: the subcommands (`serve`, `check`, `audit verify`, `mock-upstream`, `demo`).
//! - [`config`]: the TOML file and `TASKGATE_*` overrides, validated into typed fields.
//! - [`audit`]: the durable, hash-chained audit log, its sync thread and `verify`.
//! - [`app`]: builds the shared [`app::State`], starts listeners and background tasks, shuts down in order.
//! - [`server`]: accept loop, connection limits, header timeout, graceful drain.
//! - [`router`]: the route table; the only place that knows which paths exist.
//! - [`pipeline`]: one PUT, stage by stage, in the order of DESIGN.md.
//! - [`upstream`]: the pooled HTTPS client and the bearer-token source.
//! - [`error`]: the request error enum and its single mapping to the response envelope.
//! - [`metrics`]: the Prometheus registry behind `/metrics`.
//! - [`access_log`]: one JSON line per request on stdout, written off the request path.
//! - [`mock_vendor`]: the vendor emulator behind `mock-upstream`, `demo` and the tests.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod mock_vendor;
pub mod pipeline;
pub mod router;
pub mod server;
pub mod telemetry;
pub mod upstream;
