//! The vendor emulator behind `taskgate mock-upstream`, `taskgate demo` and
//! the tests: the task-update PUT and the task-initialisation GET with
//! per-user caller lines, plus knobs for tests (record every request, delay,
//! fail, reset, canned answers, residue consumption, gzip answers).

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::ids::parse_canonical_uuid;

/// The vendor page's example account and caller line.
pub const EXAMPLE_USER: &str = "5832d184-dd53-42a0-8ace-0bf8d660f4cc";
pub const EXAMPLE_TASK: &str = "f232d184-dd54-42a0-8ace-0bf8d660f4cc";
pub const EXAMPLE_LINE: &str = "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0";
/// The vendor page's example body, byte for byte.
pub const EXAMPLE_BODY: &str = r#"{"name": "API任务创建测试", "destination_extension": 3, "dial_time_id": 1, "maximumcall": 3, "caller_line_id": "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0", "remark": "API-test", "end_action": 1}"#;
/// The vendor's success answer to a task update.
pub const SUCCESS_BODY: &str = r#"{"code":200,"status":"success","message":"修改成功","data":""}"#;

/// One caller line as the task-initialisation endpoint lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub name: String,
    pub value: String,
    pub residue: i64,
    pub call_line: i64,
}

/// Caller lines per `user_id` or `user_id/sub_user_id`; `*` answers for any
/// account not listed.
pub type LineBook = HashMap<String, Vec<Line>>;

/// The built-in sample: the example user (and any other) has the example line
/// with residue 5 and a second line with residue 1.
pub fn sample_lines() -> LineBook {
    let lines = vec![
        Line {
            name: "line one".into(),
            value: EXAMPLE_LINE.into(),
            residue: 5,
            call_line: 10,
        },
        Line {
            name: "line two".into(),
            value: "37d73edf-4628-4cf1-8beb-758433fd0aab".into(),
            residue: 1,
            call_line: 1,
        },
    ];
    HashMap::from([
        (EXAMPLE_USER.to_owned(), lines.clone()),
        ("*".to_owned(), lines),
    ])
}

/// Reads a line book from a JSON file shaped like [`LineBook`].
pub fn read_lines(path: &Path) -> Result<LineBook, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// How an endpoint misbehaves, for tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer this status with a vendor error envelope.
    Status(u16),
    /// Answer this status and body verbatim (JSON content type).
    Canned(u16, String),
    /// Close the connection without an answer.
    Reset,
}

/// A request as the emulator received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub version: http::Version,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct MockOptions {
    /// When set, requests without `Authorization: Bearer <token>` get 401.
    pub token: Option<String>,
    pub lines: LineBook,
    /// A successful update lowers its line's residue by its `maximumcall`,
    /// and an update above the residue is refused, as the vendor would.
    pub consume: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            token: None,
            lines: sample_lines(),
            consume: false,
        }
    }
}

struct Shared {
    opts: MockOptions,
    lines: Mutex<LineBook>,
    recorded: Mutex<Vec<Recorded>>,
    arrived: Notify,
    delay: Mutex<Duration>,
    update_fault: Mutex<Fault>,
    init_fault: Mutex<Fault>,
    token: Mutex<Option<String>>,
    on_update: Mutex<Option<UpdateHook>>,
    /// Tests read what arrived; a long-running `mock-upstream` must not keep it.
    recording: AtomicBool,
    /// Gzip every answer whose request accepts gzip, as a vendor behind a CDN
    /// would.
    compress: AtomicBool,
}

/// At most this many requests are kept (the oldest half goes past it).
const RECORD_LIMIT: usize = 100_000;

/// Runs when a task-update PUT arrives, before it is answered (tests use it
/// to change the world at an exact point, e.g. rotate a token file).
pub type UpdateHook = Arc<dyn Fn(&Recorded) + Send + Sync>;

/// A running emulator. Knobs apply to requests that arrive after they are set.
pub struct MockVendor {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the emulator down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MockVendor {
    pub async fn start(listener: TcpListener, opts: MockOptions) -> std::io::Result<MockVendor> {
        MockVendor::start_with(listener, opts, None).await
    }

    /// Serves HTTPS with `tls` (HTTP/2 too when its ALPN list offers `h2`).
    pub async fn start_tls(
        listener: TcpListener,
        opts: MockOptions,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<MockVendor> {
        MockVendor::start_with(listener, opts, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(
        listener: TcpListener,
        opts: MockOptions,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<MockVendor> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            lines: Mutex::new(opts.lines.clone()),
            token: Mutex::new(opts.token.clone()),
            on_update: Mutex::new(None),
            recording: AtomicBool::new(true),
            compress: AtomicBool::new(false),
            opts,
            recorded: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            delay: Mutex::new(Duration::ZERO),
            update_fault: Mutex::new(Fault::None),
            init_fault: Mutex::new(Fault::None),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stopped, tls));
        Ok(MockVendor {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// Binds `addr` (use port 0 for tests) and starts.
    pub async fn bind(addr: &str, opts: MockOptions) -> std::io::Result<MockVendor> {
        MockVendor::start(TcpListener::bind(addr).await?, opts).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.recorded).clone()
    }

    /// Task-update PUTs received so far.
    pub fn updates(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::PUT)
            .collect()
    }

    /// Task-initialisation GETs received so far.
    pub fn inits(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::GET)
            .collect()
    }

    /// Waits until at least `n` requests have arrived (event-driven, no polling).
    pub async fn wait_for_requests(&self, n: usize) {
        self.wait_until(|r| r.len() >= n).await;
    }

    /// Waits until at least `n` task-update PUTs have arrived.
    pub async fn wait_for_updates(&self, n: usize) {
        self.wait_until(|r| r.iter().filter(|r| r.method == Method::PUT).count() >= n)
            .await;
    }

    async fn wait_until(&self, done: impl Fn(&[Recorded]) -> bool) {
        loop {
            let notified = self.shared.arrived.notified();
            if done(&lock(&self.shared.recorded)) {
                return;
            }
            notified.await;
        }
    }

    pub fn set_delay(&self, d: Duration) {
        *lock(&self.shared.delay) = d;
    }

    pub fn set_update_fault(&self, f: Fault) {
        *lock(&self.shared.update_fault) = f;
    }

    pub fn set_init_fault(&self, f: Fault) {
        *lock(&self.shared.init_fault) = f;
    }

    /// Keep (tests) or forget (the `mock-upstream` command) what arrives.
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
        if !on {
            lock(&self.shared.recorded).clear();
        }
    }

    /// Gzip answers (with `Content-Encoding: gzip`) to requests whose
    /// `Accept-Encoding` allows gzip, as a CDN in front of the vendor would.
    /// What is recorded is unchanged.
    pub fn set_compress(&self, on: bool) {
        self.shared.compress.store(on, Ordering::Relaxed);
    }

    pub fn set_on_update(&self, hook: Option<UpdateHook>) {
        *lock(&self.shared.on_update) = hook;
    }

    /// Requires this bearer token from now on (`None`: accept any).
    pub fn set_token(&self, token: Option<&str>) {
        *lock(&self.shared.token) = token.map(str::to_owned);
    }

    pub fn set_lines(&self, key: &str, lines: Vec<Line>) {
        lock(&self.shared.lines).insert(key.to_owned(), lines);
    }

    pub fn lines(&self, key: &str) -> Option<Vec<Line>> {
        lock(&self.shared.lines).get(key).cloned()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            () = crate::server::fired(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            async move {
                let gzip = shared.compress.load(Ordering::Relaxed) && accepts_gzip(req.headers());
                let resp = answer(&shared, req).await?;
                Ok::<_, ResetConnection>(if gzip { gzipped(resp).await } else { resp })
            }
        });
        let builder = builder.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            match tls {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                // A failed handshake (e.g. the client does not trust our CA)
                // never reaches the recorder: nothing was sent.
                Some(acceptor) => {
                    if let Ok(tls_stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(tls_stream), service)
                            .await;
                    }
                }
            }
        });
    }
    // Stopping means gone: open connections are cut, as a crashed vendor would.
    conns.abort_all();
}

/// `Err` makes hyper drop the connection without answering (Fault::Reset).
#[derive(Debug)]
struct ResetConnection;
impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset by the emulator")
    }
}
impl std::error::Error for ResetConnection {}

async fn answer(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ResetConnection> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.clone(),
        version: parts.version,
        target: target.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    if shared.recording.load(Ordering::Relaxed) {
        let mut all = lock(&shared.recorded);
        if all.len() >= RECORD_LIMIT {
            all.drain(..RECORD_LIMIT / 2);
        }
        all.push(recorded.clone());
    }
    let hook = lock(&shared.on_update).clone();
    if let Some(hook) = hook
        && parts.method == Method::PUT
    {
        hook(&recorded);
    }
    shared.arrived.notify_waiters();

    let delay = *lock(&shared.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let want = lock(&shared.token).clone();
    if let Some(want) = want {
        let ok = parts
            .headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == format!("Bearer {want}").as_bytes());
        if !ok {
            return Ok(envelope(
                StatusCode::UNAUTHORIZED,
                "error",
                "unauthorized",
                "",
            ));
        }
    }

    let path = parts.uri.path();
    let segs: Vec<&str> = path.split('/').collect();
    match (&parts.method, segs.as_slice()) {
        (&Method::PUT, ["", "agent-api", "user", user, "task", task])
            if parse_canonical_uuid(user).is_some() && parse_canonical_uuid(task).is_some() =>
        {
            let fault = lock(&shared.update_fault).clone();
            if let Some(resp) = faulty(fault)? {
                return Ok(resp);
            }
            Ok(update(shared, user, &body))
        }
        (&Method::GET, ["", "agent-api", "user", user, "task", "create"])
            if parse_canonical_uuid(user).is_some() =>
        {
            let fault = lock(&shared.init_fault).clone();
            if let Some(resp) = faulty(fault)? {
                return Ok(resp);
            }
            let sub = parts.uri.query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("sub_user_id="))
                    .map(str::to_owned)
            });
            Ok(init(shared, user, sub.as_deref()))
        }
        _ => Ok(envelope(StatusCode::NOT_FOUND, "error", "not found", "")),
    }
}

/// Whether `Accept-Encoding` allows gzip: a `gzip` (or `x-gzip`) coding, or
/// else `*`, with a q-value other than 0 (RFC 9110 §12.5.3). No header: no.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let q_zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(!q_zero);
            } else if coding == "*" {
                any = Some(!q_zero);
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// `resp` with its body gzip-compressed and labelled so.
async fn gzipped(resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let (mut parts, body) = resp.into_parts();
    let plain = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let packed = enc
        .write_all(&plain)
        .and_then(|()| enc.finish())
        .unwrap_or_default();
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts
        .headers
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(Bytes::from(packed)))
}

fn faulty(fault: Fault) -> Result<Option<Response<Full<Bytes>>>, ResetConnection> {
    match fault {
        Fault::None => Ok(None),
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(Some(envelope(status, "error", "emulated failure", "")))
        }
        Fault::Canned(code, body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(Some(resp))
        }
        Fault::Reset => Err(ResetConnection),
    }
}

fn line_key(user: &str, sub: Option<&str>) -> String {
    match sub {
        Some(s) => format!("{}/{}", user.to_ascii_lowercase(), s.to_ascii_lowercase()),
        None => user.to_ascii_lowercase(),
    }
}

fn update(shared: &Shared, user: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return envelope(StatusCode::BAD_REQUEST, "error", "invalid json", "");
    };
    if shared.opts.consume {
        let sub = v.get("sub_user_id").and_then(|s| s.as_str());
        let line_id = v
            .get("caller_line_id")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        let want = v.get("maximumcall").and_then(|m| m.as_i64()).unwrap_or(0);
        let key = line_key(user, sub);
        let mut book = lock(&shared.lines);
        if !book.contains_key(&key)
            && let Some(default) = book.get("*").cloned()
        {
            book.insert(key.clone(), default);
        }
        let line = book.get_mut(&key).and_then(|lines| {
            lines
                .iter_mut()
                .find(|l| l.value.eq_ignore_ascii_case(line_id))
        });
        match line {
            Some(l) if l.residue >= want => l.residue -= want,
            Some(_) => {
                return envelope(
                    StatusCode::BAD_REQUEST,
                    "error",
                    "maximumcall exceeds residue",
                    "",
                );
            }
            None => return envelope(StatusCode::BAD_REQUEST, "error", "unknown caller line", ""),
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(SUCCESS_BODY.as_bytes())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn init(shared: &Shared, user: &str, sub: Option<&str>) -> Response<Full<Bytes>> {
    let book = lock(&shared.lines);
    let lines = book
        .get(&line_key(user, sub))
        .or_else(|| book.get("*"))
        .cloned()
        .unwrap_or_default();
    let body = serde_json::json!({
        "code": 200, "status": "success", "message": "success",
        "data": {"caller_line_list": lines},
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn envelope(status: StatusCode, kind: &str, message: &str, data: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"code": status.as_u16(), "status": kind, "message": message, "data": data});
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
