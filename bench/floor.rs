//! The floor taskgate is measured against: a bare hyper forwarder with no
//! pipeline. One `http1::Builder` connection per accepted socket, the body
//! buffered, the bearer token injected, forwarded through hyper-util's pooled
//! client over plain HTTP, the answer buffered and passed back. Same runtime
//! shape as taskgate's default (one tokio worker).
//!
//! `cargo build --release --example floor`, then
//! `floor LISTEN_PORT UPSTREAM_PORT` with the token in `FLOOR_TOKEN`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Upstream = Client<HttpConnector, Full<Bytes>>;

async fn forward(
    client: Upstream,
    upstream: String,
    token: HeaderValue,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{upstream}{path}").parse::<Uri>() else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let mut out = Request::new(Full::new(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = parts.headers;
    out.headers_mut().remove(HOST);
    out.headers_mut().insert(AUTHORIZATION, token);
    let Ok(resp) = client.request(out).await else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let (parts, body) = resp.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = parts.status;
    if let Some(ct) = parts.headers.get(CONTENT_TYPE) {
        resp.headers_mut().insert(CONTENT_TYPE, ct.clone());
    }
    Ok(resp)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream_port)) = (args.next(), args.next()) else {
        return Err("usage: floor LISTEN_PORT UPSTREAM_PORT (token in FLOOR_TOKEN)".into());
    };
    let token = HeaderValue::from_str(&format!(
        "Bearer {}",
        std::env::var("FLOOR_TOKEN").map_err(|_| "FLOOR_TOKEN is not set")?
    ))?;
    let listen: SocketAddr = format!("127.0.0.1:{listen}").parse()?;
    let upstream = format!("127.0.0.1:{upstream_port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new()).build(http);
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (client, upstream, token) = (client.clone(), upstream.clone(), token.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    forward(client.clone(), upstream.clone(), token.clone(), req)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
