//! Prometheus metrics with the names of DESIGN.md, served on the admin
//! listener's `/metrics`. A leaf: callers pass plain values in.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub status: u16,
    /// Empty when the vendor's answer was passed through.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResultLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histogram,
    pub upstream_requests: Family<StatusLabel, Counter>,
    pub upstream_duration: Histogram,
    pub rate_limited: Counter,
    pub residue_lookups: Family<ResultLabel, Counter>,
    pub audit_records: Family<EventLabel, Counter>,
    pub audit_dropped: Family<EventLabel, Counter>,
    pub audit_torn_lines: Counter,
    pub audit_file_replaced: Counter,
    pub audit_rejected_skipped: Counter,
    pub audit_fsync: Histogram,
    pub inflight: Gauge,
    pub access_log_dropped: Counter,
    pub shared_up: Gauge,
    pub shared_requests: Family<OpResultLabels, Counter>,
    pub shared_duration: Family<OpLabel, Histogram>,
    pub residue_lock_wait: Histogram,
}

/// 50 µs to ~1.6 s: loopback Redis answers in well under a millisecond.
fn shared_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 16,
    ))
}

/// 100 µs to ~13 s: gateway overhead is sub-millisecond, vendor calls seconds.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("taskgate");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Histogram::new(latency_buckets()),
            upstream_requests: Family::default(),
            upstream_duration: Histogram::new(latency_buckets()),
            rate_limited: Counter::default(),
            residue_lookups: Family::default(),
            audit_records: Family::default(),
            audit_dropped: Family::default(),
            audit_torn_lines: Counter::default(),
            audit_file_replaced: Counter::default(),
            audit_rejected_skipped: Counter::default(),
            audit_fsync: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16),
            ),
            inflight: Gauge::default(),
            access_log_dropped: Counter::default(),
            shared_up: Gauge::default(),
            shared_requests: Family::default(),
            shared_duration: Family::new_with_constructor(shared_histogram),
            residue_lock_wait: Histogram::new(latency_buckets()),
            registry: Registry::default(),
        };
        // Counters get `_total` appended by the encoder.
        registry.register(
            "requests",
            "Requests answered, by status and taskgate reason",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_requests",
            "Task updates forwarded to the vendor, by vendor status (0 = no answer)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Vendor round trip of forwarded updates",
            m.upstream_duration.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by the rate limiter",
            m.rate_limited.clone(),
        );
        registry.register(
            "residue_lookups",
            "Caller line list lookups: hit, miss (fetched) or error",
            m.residue_lookups.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records made durable or written",
            m.audit_records.clone(),
        );
        registry.register(
            "audit_dropped_records",
            "Audit records that could not be written",
            m.audit_dropped.clone(),
        );
        registry.register(
            "audit_torn_lines",
            "Torn final lines found in the audit log at start-up",
            m.audit_torn_lines.clone(),
        );
        registry.register(
            "audit_file_replaced",
            "Times the file at audit.path was removed, renamed or replaced under the running gateway",
            m.audit_file_replaced.clone(),
        );
        registry.register(
            "audit_rejected_skipped",
            "Rejected records not written because of audit.rejected_per_second",
            m.audit_rejected_skipped.clone(),
        );
        registry.register(
            "audit_fsync_seconds",
            "Duration of audit log fsyncs",
            m.audit_fsync.clone(),
        );
        registry.register(
            "inflight_requests",
            "Requests being handled",
            m.inflight.clone(),
        );
        registry.register(
            "shared_up",
            "1 while the shared state (Redis) answers; 0 while it does not (shared.on_unavailable applies) and when [shared] is not configured",
            m.shared_up.clone(),
        );
        registry.register(
            "shared_requests",
            "Calls to the shared state by operation and result (ok, error, timeout, skipped)",
            m.shared_requests.clone(),
        );
        registry.register(
            "shared_duration_seconds",
            "Round trip of calls to the shared state, by operation",
            m.shared_duration.clone(),
        );
        registry.register(
            "residue_lock_wait_seconds",
            "Time an update waited for its caller line (this process's lock and the shared lease)",
            m.residue_lock_wait.clone(),
        );
        registry.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because stdout could not keep up",
            m.access_log_dropped.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// One caller-line-list lookup: `hit`, `miss` (fetched) or `error`.
    pub fn count_lookup(&self, result: &'static str) {
        self.residue_lookups
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// One forwarded update by vendor status (0 when none came back), with
    /// the vendor's round trip when it answered.
    pub fn observe_upstream(&self, status: u16, round_trip: Option<std::time::Duration>) {
        self.upstream_requests
            .get_or_create(&StatusLabel { status })
            .inc();
        if let Some(rt) = round_trip {
            self.upstream_duration.observe(rt.as_secs_f64());
        }
    }

    /// One call to the shared state.
    pub fn count_shared(&self, op: &'static str, result: &'static str) {
        self.shared_requests
            .get_or_create(&OpResultLabels { op, result })
            .inc();
    }

    pub fn observe_shared(&self, op: &'static str, elapsed: std::time::Duration) {
        self.shared_duration
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_design() {
        let m = Metrics::default();
        m.requests
            .get_or_create(&RequestLabels {
                status: 200,
                reason: "",
            })
            .inc();
        m.upstream_requests
            .get_or_create(&StatusLabel { status: 200 })
            .inc();
        m.residue_lookups
            .get_or_create(&ResultLabel { result: "hit" })
            .inc();
        m.audit_records
            .get_or_create(&EventLabel { event: "attempt" })
            .inc();
        m.rate_limited.inc();
        let text = m.encode();
        for name in [
            "taskgate_requests_total{status=\"200\",reason=\"\"} 1",
            "taskgate_request_duration_seconds_bucket",
            "taskgate_upstream_requests_total{status=\"200\"} 1",
            "taskgate_upstream_duration_seconds_bucket",
            "taskgate_rate_limited_total 1",
            "taskgate_residue_lookups_total{result=\"hit\"} 1",
            "taskgate_audit_records_total{event=\"attempt\"} 1",
            "taskgate_audit_fsync_seconds_bucket",
            "taskgate_inflight_requests 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
