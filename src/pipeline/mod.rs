//! One task update, stage by stage, in the order of DESIGN.md. `handle` is
//! the outer handler (request id, error mapping, access log); `update` is the
//! straight line of stages, each a `?`.

pub mod access;
pub mod body;
pub mod dry_run;
pub mod forward;
pub mod rate_limit;
pub mod residue;
pub mod state;
pub mod validate;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;

use serde_json::Value;
use uuid::Uuid;

use crate::access_log::AccessLine;
use crate::audit::{Event, Record, bounded_request, now_timestamp};
use crate::config::Config;
use crate::error::Error;
use crate::ids;
use crate::metrics::RequestLabels;
use crate::peer::Peer;
use crate::router::{self, TaskRoute};
use crate::secret::Token;
use rate_limit::{Decision, RateKey};
use residue::Verdict;
use state::{Live, State};
use tokio::sync::oneshot::error::TryRecvError;

/// What one request accumulates on its way through, for the access log and
/// the audit records.
pub struct Exchange {
    pub request_id: String,
    pub client: Peer,
    /// The `[[access.callers]]` name the request authenticated as.
    pub caller: Option<String>,
    /// `X-Taskgate-Dry-Run: true`: answered before forwarding, never audited.
    pub dry_run: bool,
    pub route: Option<TaskRoute>,
    pub sub_user_id: Option<Uuid>,
    /// The parsed body, for the audit record.
    pub request: Option<Value>,
    pub stage: Stage,
    pub upstream_ms: Option<f64>,
    pub bytes_in: u64,
    /// `[shared]` is configured but this request used this process's limiter
    /// or line lock because Redis did not answer (the audit `note` says so).
    pub shared_degraded: bool,
    /// The body as read, for a `rejected` record's bounded copy.
    pub body: Option<Bytes>,
}

/// How far a request got, which decides what the audit log gets on error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Refused before its body was looked at (404, 405, invalid_header,
    /// overloaded): no record.
    Routing,
    /// A mutation under examination: a refusal is a `rejected` record.
    Examined,
    /// The `attempt` is durable; the forward writes the `outcome` itself.
    Attempted,
}

impl Exchange {
    /// A record with this request's identifying fields filled in.
    fn record(&self, event: Event) -> Record {
        Record {
            client: Some(self.client.label().to_owned()),
            caller: self.caller.clone(),
            user_id: self.route.map(|r| r.user_id.to_string()),
            sub_user_id: self.sub_user_id.map(|s| s.to_string()),
            task_id: self.route.map(|r| r.task_id.to_string()),
            ..Record::new(event, self.request_id.clone())
        }
    }
}

/// Entry point for the data listener. The request runs to completion even
/// when its caller hangs up: it must not be cut off between its attempt
/// record, the forward, its outcome record and its access-log line. It runs
/// inline in the connection's task (no task, no hand-off per request); only
/// when hyper drops it unfinished is the rest moved to a task of its own.
/// (A plain function: the future hyper holds per connection is then just
/// the small `ToTheEnd`, the request's own state behind its box.)
pub fn handle(
    state: Arc<State>,
    client: Peer,
    req: Request<Incoming>,
) -> impl Future<Output = Response<Full<Bytes>>> + Send + 'static {
    let request_id = ids::request_id(req.headers());
    // Dropped when the caller hangs up: the request then forwards nothing
    // that is not already on its way.
    let (caller, caller_gone) = tokio::sync::oneshot::channel::<()>();
    let tasks = state.requests.clone();
    ToTheEnd {
        run: Some(Box::pin(process(
            state,
            client,
            req,
            request_id.clone(),
            caller_gone,
        ))),
        caller: Some(caller),
        tasks,
        request_id,
    }
}

/// A request's future, polled where it stands; if it is dropped before it
/// finishes (the caller hung up), the rest runs on `tasks`, which shutdown
/// waits for.
struct ToTheEnd<F: Future<Output = Response<Full<Bytes>>> + Send + 'static> {
    run: Option<Pin<Box<F>>>,
    /// Dropped first, so the request learns its caller is gone.
    caller: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: tokio_util::task::TaskTracker,
    /// For the 500 if the request panics.
    request_id: String,
}

impl<F: Future<Output = Response<Full<Bytes>>> + Send + 'static> Future for ToTheEnd<F> {
    type Output = Response<Full<Bytes>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(run) = self.run.as_mut() else {
            // Polled after completion: a bug in the caller, not a request.
            return Poll::Ready(Error::Internal.into_response());
        };
        // A panic ends this request with a 500, not its connection (as a
        // task of its own would).
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.as_mut().poll(cx)));
        let out = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(out)) => out,
            Err(_) => {
                tracing::error!(request_id = %self.request_id, "request panicked");
                let mut resp = Error::Internal.into_response();
                if let Ok(v) = HeaderValue::from_str(&self.request_id) {
                    resp.headers_mut().insert("x-request-id", v);
                }
                resp
            }
        };
        self.run = None;
        Poll::Ready(out)
    }
}

impl<F: Future<Output = Response<Full<Bytes>>> + Send + 'static> Drop for ToTheEnd<F> {
    fn drop(&mut self) {
        drop(self.caller.take());
        if let Some(run) = self.run.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            self.tasks.spawn_on(run, &rt);
        }
    }
}

/// The outer handler: every response, success or error, leaves here with
/// `X-Request-Id`, one access-log line and, for a refused mutation, its
/// `rejected` audit record.
async fn process(
    state: Arc<State>,
    client: Peer,
    req: Request<Incoming>,
    request_id: String,
    caller_gone: CallerGone,
) -> Response<Full<Bytes>> {
    let state = &state;
    let started = Instant::now();
    let mut ex = Exchange {
        request_id,
        client,
        caller: None,
        dry_run: false,
        route: None,
        sub_user_id: None,
        request: None,
        stage: Stage::Routing,
        upstream_ms: None,
        bytes_in: 0,
        shared_degraded: false,
        body: None,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    // Past `max_inflight` answer at once rather than queue without bound.
    let inflight = InflightGuard::enter(state);
    let live = state.live.load_full();
    let result = if inflight.count > live.config.limits.max_inflight {
        Err(Error::Overloaded)
    } else {
        update(state, &live, &mut ex, req, caller_gone).await
    };
    let (mut resp, reason) = match result {
        Ok(resp) => (resp, None),
        Err(err) => {
            let reason = err.reason();
            // A dry run changes nothing, so a refused one leaves no record.
            if ex.stage == Stage::Examined && !ex.dry_run {
                // Not waited for: a refusal is answered at once.
                state.audit.append(Record {
                    reason: Some(reason.to_owned()),
                    request: ex.body.as_ref().and_then(|body| {
                        bounded_request(
                            body,
                            ex.request.take(),
                            state.audit.rejected_request_max_bytes(),
                        )
                    }),
                    residue: match &err {
                        Error::ResidueExceeded { residue, .. } => Some(*residue),
                        _ => None,
                    },
                    ..ex.record(Event::Rejected)
                });
            }
            (err.into_response(), Some(reason))
        }
    };
    if let Ok(v) = HeaderValue::from_str(&ex.request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }

    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            status,
            reason: reason.unwrap_or(""),
        })
        .inc();
    state
        .metrics
        .request_duration
        .observe(elapsed.as_secs_f64());
    let bytes_out = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    state.access_log.write(&AccessLine {
        ts: &now_timestamp(),
        request_id: &ex.request_id,
        client: ex.client.label(),
        caller: ex.caller.as_deref(),
        method: method.as_str(),
        // Bounded so a hostile path cannot bloat the log.
        path: truncate(&path, 512),
        status,
        reason,
        dry_run: ex.dry_run,
        user_id: ex.route.map(|r| r.user_id.to_string()),
        task_id: ex.route.map(|r| r.task_id.to_string()),
        latency_ms: ms(elapsed),
        upstream_ms: ex.upstream_ms,
        bytes_in: ex.bytes_in,
        bytes_out,
    });
    resp
}

/// The stages. Nothing reaches `forward` that was not routed, let through
/// by caller control, read, validated, admitted by the rate limit and the
/// residue rule, and durably recorded first.
async fn update(
    state: &Arc<State>,
    live: &Arc<Live>,
    ex: &mut Exchange,
    req: Request<Incoming>,
    caller_gone: CallerGone,
) -> Result<Response<Full<Bytes>>, Error> {
    // Only the one known route with canonical ids; 404/405 otherwise.
    let route = router::route(req.method(), req.uri())?;
    ex.route = Some(route);
    // Known before any stage can refuse the request, since a dry run leaves
    // no audit record, refused or not; an unknown value is 400.
    ex.dry_run = dry_run::requested(req.headers())?;
    ex.stage = Stage::Examined;
    let (mut parts, incoming) = req.into_parts();

    // Caller control before the body is read, so a refused caller costs
    // nothing: the peer's uid and the caller's key (403/401), then whether
    // the gateway and that caller may act for this user (403).
    let access = &live.config.access;
    let caller = access::identify(access, &ex.client, &parts.headers)?;
    ex.caller = caller.map(|c| c.name.clone());
    access::authorize(access, caller, route.user_id)?;
    // The caller's key has done its job; it must not travel any further
    // (forward drops every client Authorization anyway).
    parts.headers.remove(header::AUTHORIZATION);

    // Framing, media type, size, one JSON object: 400/415/413/400. The body
    // must arrive within the header timeout too, or a slow sender holds a
    // slot forever.
    let limits = &live.config.limits;
    body::check_head(&parts.headers, ex.client.saw_ambiguous_framing())?;
    body::check_declared(&parts.headers, limits.max_body_bytes)?;
    let read = tokio::time::timeout(
        limits.header_read_timeout,
        body::read(incoming, limits.max_body_bytes),
    );
    let mut read = std::pin::pin!(read);
    // Usually the body came with the head and is read at once. When it is
    // still on its way, the request lets go of hyper's read buffer first
    // (its head's headers and URI are slices of it), so a slow sender holds
    // one buffer, not two.
    let read = match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
        Poll::Ready(done) => done,
        Poll::Pending => {
            parts.headers = body::detach(&parts.headers);
            parts.uri = http::Uri::default();
            read.await
        }
    };
    let bytes = read.map_err(|_| Error::RequestTimeout)??;
    ex.bytes_in = bytes.len() as u64;
    ex.body = Some(bytes.clone());
    let object = body::parse_object(&bytes)?;

    // The vendor contract, every broken field at once: 422. Later stages
    // read the typed update, never the JSON again.
    let task = validate::validate(&object, live.config.validation.allow_unknown_fields);
    ex.request = Some(Value::Object(object));
    let task = task.map_err(Error::ValidationFailed)?;
    ex.sub_user_id = task.sub_user_id;

    // The rest is boxed: a request still waiting for its body (500 slow
    // senders, say) holds only the small future above, not the largest
    // state of every later stage.
    Box::pin(admit_and_forward(
        state,
        live,
        ex,
        Checked {
            route,
            task,
            client_headers: parts.headers,
            bytes,
        },
        caller_gone,
    ))
    .await
}

/// A request that passed routing, caller control, the body checks and
/// validation.
struct Checked {
    route: TaskRoute,
    task: validate::TaskUpdate,
    client_headers: http::HeaderMap,
    bytes: Bytes,
}

/// The stages after validation: rate limit, residue rule (a dry run ends
/// there), the durable attempt, the forward and its outcome.
async fn admit_and_forward(
    state: &Arc<State>,
    live: &Arc<Live>,
    ex: &mut Exchange,
    checked: Checked,
    mut caller_gone: CallerGone,
) -> Result<Response<Full<Bytes>>, Error> {
    let Checked {
        route,
        task,
        client_headers,
        bytes,
    } = checked;
    // Per-user GCRA before anything costs the vendor a call: 429. With
    // `[shared]`, one bucket per key for every replica.
    let key = RateKey::new(&live.config.rate_limit.key, route.user_id, task.sub_user_id);
    let (decision, source) = rate_limit::admit(
        state.shared.as_deref(),
        live.limiter.as_ref(),
        &live.config.rate_limit,
        key,
    )
    .await?;
    ex.shared_degraded |= source == rate_limit::Source::LocalFallback;
    let (limit, remaining) = match decision {
        Decision::Allowed { limit, remaining } => (limit, remaining),
        Decision::Limited {
            retry_after_secs, ..
        } => {
            state.metrics.rate_limited.inc();
            return Err(Error::RateLimited { retry_after_secs });
        }
    };

    let uri = forward::task_uri(&live.config.upstream, &route)?;

    // Residue rule: one update per (user, sub-user, line) at a time from here
    // until the vendor has answered, checked against a list no older than
    // the cache TTL and never older than the last admitted update: 409/422/503.
    let token = state.token.get();
    let list_key = (route.user_id, task.sub_user_id);
    // A queue behind a slow vendor is bounded: past the upstream timeout the
    // caller has most likely given up, so say so rather than wait on. With
    // `[shared]` the line is held across replicas too (a lease in Redis).
    let lookup = residue::Lookup {
        client: &live.client,
        upstream: &live.config.upstream,
        token: &token,
        request_id: &ex.request_id,
    };
    let residue::Admitted {
        hold,
        verdict,
        degraded,
    } = state
        .residue
        .admit(
            state.shared.as_deref(),
            &live.config.residue,
            lookup,
            (list_key, task.caller_line_id, task.maximumcall),
            lease_duration(&live.config),
            live.config.upstream.timeout,
            |waited| {
                state
                    .metrics
                    .residue_lock_wait
                    .observe(waited.as_secs_f64())
            },
            |r| state.metrics.count_lookup(r.as_str()),
        )
        .await?;
    ex.shared_degraded |= degraded;

    // A dry run ends here, every check made: nothing is forwarded or
    // recorded, and the line (lock and shared lease) goes now rather than
    // after a vendor call.
    if ex.dry_run {
        state
            .residue
            .release_unused(state.shared.as_deref(), hold)
            .await;
        let residue = match &verdict {
            Verdict::Checked { residue, .. } => Some(*residue),
            Verdict::Disabled | Verdict::UnavailableAllowed => None,
        };
        let mut resp = dry_run::answer(residue, task.maximumcall);
        let h = resp.headers_mut();
        h.insert("ratelimit-limit", HeaderValue::from(limit));
        h.insert("ratelimit-remaining", HeaderValue::from(remaining));
        return Ok(resp);
    }

    // The attempt is on disk before a byte goes to the vendor: 503 if not
    // (a stalled disk included). A caller that has hung up by now gets
    // nothing forwarded. Either way the line is let go at once.
    let checked_list =
        match Box::pin(durable_attempt(state, live, ex, verdict, &mut caller_gone)).await {
            Ok(list) => list,
            Err(refusal) => {
                state
                    .residue
                    .release_unused(state.shared.as_deref(), hold)
                    .await;
                return Err(refusal);
            }
        };
    ex.stage = Stage::Attempted;

    // From here the vendor may see the update.
    let job = Forward {
        state: state.clone(),
        live: live.clone(),
        uri,
        client_headers,
        bytes,
        token,
        outcome: ex.record(Event::Outcome),
        list_key,
        checked_list,
        caller_line: task.caller_line_id,
        maximumcall: task.maximumcall,
        hold,
    };
    let answer = job.run().await?;
    ex.upstream_ms = Some(ms(answer.upstream_time));

    // The vendor's status, Content-Type and body, unchanged.
    let mut resp = Response::new(Full::new(answer.body));
    *resp.status_mut() = answer.status;
    let h = resp.headers_mut();
    if let Some(ct) = answer.content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    if let Some(ce) = answer.content_encoding {
        h.insert(header::CONTENT_ENCODING, ce);
    }
    h.insert("ratelimit-limit", HeaderValue::from(limit));
    h.insert("ratelimit-remaining", HeaderValue::from(remaining));
    Ok(resp)
}

/// Writes the `attempt` record and waits until it is durable (per
/// `audit.fsync`), unless the caller has hung up; returns the line list the
/// update was checked against.
async fn durable_attempt(
    state: &State,
    live: &Live,
    ex: &mut Exchange,
    verdict: Verdict,
    caller_gone: &mut CallerGone,
) -> Result<Option<Arc<residue::LineList>>, Error> {
    if caller_gone.try_recv() == Err(TryRecvError::Closed) {
        return Err(Error::ClientClosed);
    }
    let (residue, note, checked_list) = match verdict {
        Verdict::Checked { residue, list } => (Some(residue), None, Some(list)),
        Verdict::Disabled => (None, Some("residue rule disabled"), None),
        Verdict::UnavailableAllowed => (
            None,
            Some("caller line list unavailable; forwarded by residue.on_unavailable = allow"),
            None,
        ),
    };
    let degraded_note = ex.shared_degraded.then_some(
        "shared state (Redis) unavailable: this replica's own rate limit and line lock applied (shared.on_unavailable = local)",
    );
    let note = match (note, degraded_note) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b).map(str::to_owned),
    };
    let attempt = Record {
        residue,
        note,
        request: ex.request.take(),
        ..ex.record(Event::Attempt)
    };
    match tokio::time::timeout(
        live.config.upstream.timeout,
        state.audit.append_durable_as(attempt, state.audit_caller()),
    )
    .await
    {
        Ok(Ok(_seq)) => Ok(checked_list),
        Ok(Err(e)) => {
            tracing::error!(cause = %e, request_id = %ex.request_id, "audit attempt not durable; refusing");
            Err(Error::AuditUnavailable)
        }
        Err(_) => {
            tracing::error!(request_id = %ex.request_id, "audit attempt not durable in time; refusing");
            Err(Error::AuditUnavailable)
        }
    }
}

/// How long a shared line lease lasts: past the holder's own deadline (a
/// vendor read, the attempt and the forward, each bounded by the upstream
/// timeout) with a margin, and past the cached list's TTL, so a lease kept
/// after an unknown outcome outlives the value it protects.
fn lease_duration(cfg: &Config) -> std::time::Duration {
    let margin = std::time::Duration::from_secs(1);
    (cfg.upstream.timeout * 3 + margin).max(cfg.residue.cache_ttl + margin)
}

/// How long a list's generation outlives its last bump: longer than any
/// vendor read still in flight, so such a read cannot refill a stale list.
fn generation_ttl(cfg: &Config) -> std::time::Duration {
    cfg.residue.cache_ttl + cfg.upstream.timeout * 2 + std::time::Duration::from_secs(1)
}

/// Closed when the caller has hung up (its `handle` future was dropped).
type CallerGone = tokio::sync::oneshot::Receiver<()>;

/// Everything the forward stage needs: it writes the outcome record and
/// drops the cached line list whatever happens.
struct Forward {
    state: Arc<State>,
    live: Arc<Live>,
    uri: http::Uri,
    client_headers: http::HeaderMap,
    bytes: Bytes,
    token: Token,
    outcome: Record,
    list_key: residue::ListKey,
    /// The list the update was checked against (residue rule on and read).
    checked_list: Option<Arc<residue::LineList>>,
    caller_line: Uuid,
    maximumcall: i64,
    /// Released only after the cached residue is settled (the lock by drop,
    /// the shared lease by `settle_shared`).
    hold: Option<residue::LineHold>,
}

impl Forward {
    async fn run(self) -> Result<forward::Forwarded, Error> {
        let Forward {
            state,
            live,
            uri,
            client_headers,
            bytes,
            token,
            outcome,
            list_key,
            checked_list,
            caller_line,
            maximumcall,
            mut hold,
        } = self;
        let started = Instant::now();
        // Token, header hygiene, URI from the checked ids, timeouts, retry.
        let upstream = &live.config.upstream;
        let request_id = outcome.request_id.clone();
        let send = |token: &Token| {
            let headers = forward::upstream_headers(&client_headers, token, &request_id);
            forward::send(
                &live.client,
                upstream,
                http::Method::PUT,
                uri.clone(),
                headers,
                bytes.clone(),
            )
        };
        let mut answer = send(&token).await;
        // A 401 may mean the token file was rotated under us. The vendor
        // applied nothing it refused, so re-read the file and try once more.
        if matches!(&answer, Ok(a) if a.status == http::StatusCode::UNAUTHORIZED)
            && let Some(fresh) = newer_token(&state, &token).await
        {
            answer = send(&fresh).await;
            if let Ok(a) = &mut answer {
                a.body = fresh.redact_in(std::mem::take(&mut a.body));
            }
        }
        if let Ok(a) = &mut answer {
            a.body = token.redact_in(std::mem::take(&mut a.body));
        }
        let envelope = answer.as_ref().ok().map(|a| vendor_envelope(&a.body));
        // The cached residue must not outlive what this update changed: an
        // accepted update lowers it (or drops the list, per
        // residue.after_update); anything else may or may not have been
        // applied, so the list is read again next time.
        let accepted = matches!((&answer, &envelope), (Ok(a), Some((code, _)))
            if a.status.is_success() && code.is_none_or(|c| c == 200));
        match (accepted, &checked_list) {
            (true, Some(checked)) => state.residue.settle(
                &live.config.residue,
                list_key,
                checked,
                caller_line,
                maximumcall,
            ),
            _ => state.residue.invalidate(list_key, caller_line),
        }

        let record = match &answer {
            Ok(a) => {
                let (code, message) = envelope.unwrap_or_default();
                Record {
                    upstream_status: Some(a.status.as_u16()),
                    upstream_code: code,
                    upstream_message: message,
                    latency_ms: Some(ms(a.upstream_time)),
                    ..outcome
                }
            }
            // The vendor's status stays when its body then failed: the
            // update may have been applied.
            Err(e) => Record {
                reason: Some(e.error.reason().to_owned()),
                upstream_status: e.status.map(|s| s.as_u16()),
                latency_ms: Some(ms(started.elapsed())),
                ..outcome
            },
        };
        // Written (not synced) before the caller is answered, so a crash
        // after the answer does not lose it.
        state
            .audit
            .append_written_as(record, state.audit_caller())
            .await;
        // Every replica's cached residue of the line is settled before its
        // lease goes; an unknown answer (timeout, reset) keeps the lease.
        if let (Some(shared), Some(lease)) = (
            state.shared.as_deref(),
            hold.as_mut().and_then(|h| h.lease.take()),
        ) {
            let answer_known = match &answer {
                Ok(_) => true,
                Err(e) => !e.maybe_seen,
            };
            state
                .residue
                .settle_shared(
                    shared,
                    &live.config.residue,
                    list_key,
                    caller_line,
                    lease,
                    accepted,
                    answer_known,
                    maximumcall,
                    generation_ttl(&live.config),
                )
                .await;
        }
        // Only now may the next update of this line go: its attempt record
        // comes after this outcome.
        drop(hold);
        state.metrics.observe_upstream(
            match &answer {
                Ok(a) => a.status.as_u16(),
                Err(e) => e.status.map_or(0, |s| s.as_u16()),
            },
            answer.as_ref().ok().map(|a| a.upstream_time),
        );
        answer.map_err(Error::from)
    }
}

/// After the vendor refused `used`: the token file re-read on a blocking
/// thread (never on a worker), and the token in force if it is newer.
async fn newer_token(state: &State, used: &Token) -> Option<Token> {
    let source = state.token.clone();
    let used = used.clone();
    tokio::task::spawn_blocking(move || source.newer_than(&used))
        .await
        .ok()
        .flatten()
}

/// `code` and `message` when the vendor answered its usual envelope.
fn vendor_envelope(body: &[u8]) -> (Option<i64>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        code: Option<Value>,
        message: Option<Value>,
    }
    let Ok(env) = serde_json::from_slice::<Envelope>(body) else {
        return (None, None);
    };
    let code = env.code.and_then(|c| match c {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    });
    let message = env
        .message
        .and_then(|m| m.as_str().map(|s| truncate(s, 1024).to_owned()));
    (code, message)
}

/// Counts a request in `inflight` for as long as it lives.
struct InflightGuard<'a> {
    state: &'a State,
    count: usize,
}

impl<'a> InflightGuard<'a> {
    fn enter(state: &'a State) -> Self {
        let count = state.inflight.fetch_add(1, Ordering::AcqRel) + 1;
        state.metrics.inflight.inc();
        InflightGuard { state, count }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.inflight.dec();
    }
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
