//! taskgate: a sidecar reverse proxy in front of a vendor's task-update API.
//!
//! # Layout
//!
//! Dependencies point down this list only (no module imports one above it):
//!
//! - [`cli`]: the subcommands (`serve`, `check`, `audit verify`, `mock-upstream`, `demo`).
//! - [`mock_vendor`]: the vendor emulator behind `mock-upstream`, `demo` and the tests.
//! - [`signals`]: SIGTERM/SIGINT/SIGHUP, caught before start-up begins.
//! - [`app`]: composes the shared state, owns every task, shuts down in order.
//! - [`reload`]: SIGHUP's re-read of the config file, and what it changed.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`server`]: accept loop, connection limits, header timeout, lingering close, graceful drain.
//! - [`listener`]: the TCP and Unix-socket listeners behind one trait; the socket file's life.
//! - [`pipeline`]: one PUT, stage by stage, in the order of DESIGN.md, and the state it shares.
//! - [`router`]: the route table; the only place that knows which paths exist.
//! - [`upstream`]: the pooled HTTPS client and the token in force.
//! - [`shared`]: Redis for what every replica must share (buckets, line leases, line lists).
//! - [`audit`]: the durable, hash-chained audit log, its sync thread and `verify`.
//! - [`access_log`]: one JSON line per request on stdout, written off the request path.
//! - leaves, importing nothing above them: [`config`] (the TOML file and
//!   `TASKGATE_*` overrides, validated into typed fields), [`error`] (the
//!   request error and its single mapping to the envelope), [`metrics`],
//!   [`secret`] (the token, caller keys, the Redis URL), [`peer`], [`ids`],
//!   [`telemetry`].
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod error;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod mock_vendor;
pub mod peer;
pub mod pipeline;
pub mod reload;
pub mod router;
pub mod secret;
pub mod server;
pub mod shared;
pub mod signals;
pub mod telemetry;
pub mod upstream;
