//! The walking skeleton end to end: the real binary in front of the emulator.

mod support;

use std::sync::Arc;

use http::Method;
use support::*;

const NO_RESIDUE: &str = "[residue]\nenabled = false";

#[tokio::test]
async fn example_update_goes_through_with_the_token_injected() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;

    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.text(),
        SUCCESS_BODY,
        "the vendor's body comes back unchanged"
    );
    assert_eq!(resp.headers["content-type"], "application/json");
    let rid = resp.request_id();

    let seen = vendor.updates();
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.target, example_path(), "canonical path, no query");
    assert_eq!(got.headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(
        got.body,
        EXAMPLE_BODY.as_bytes(),
        "the caller's bytes, unchanged"
    );
    assert_eq!(got.headers["x-request-id"], rid.as_str());

    let line = gw.access_line(&rid).await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "PUT");
    assert_eq!(line["user_id"], EXAMPLE_USER);
    assert_eq!(line["task_id"], EXAMPLE_TASK);
    assert_eq!(line["bytes_in"], EXAMPLE_BODY.len());
    assert_eq!(line["bytes_out"], SUCCESS_BODY.len());
    assert!(line["upstream_ms"].as_f64().is_some());
    for key in ["ts", "client", "path", "latency_ms"] {
        assert!(!line[key].is_null(), "access log has {key}");
    }
    assert!(!resp.text().contains(TOKEN));
    gw.assert_token_never_logged();
}

#[tokio::test]
async fn client_credentials_never_reach_the_vendor_and_request_id_is_kept() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    let resp = send(
        Method::PUT,
        &gw.url(&example_path()),
        &[
            ("content-type", "application/json; charset=utf-8"),
            ("authorization", "Bearer client-supplied"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("cookie", "session=abc"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("x-request-id", "caller-id-42"),
            ("user-agent", "billing-svc/3"),
        ],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.request_id(), "caller-id-42");
    let got = &vendor.updates()[0];
    assert_eq!(got.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(got.headers["authorization"], format!("Bearer {TOKEN}"));
    assert!(got.headers.get("cookie").is_none());
    assert!(got.headers.get("proxy-authorization").is_none());
    assert!(got.headers.get("x-hop").is_none());
    assert_eq!(got.headers["x-request-id"], "caller-id-42");
    assert_eq!(got.headers["user-agent"], "billing-svc/3");
    assert_eq!(
        got.headers["host"],
        vendor.addr.to_string(),
        "Host is the upstream's"
    );
}

#[tokio::test]
async fn refusals_carry_their_reason_and_never_reach_the_vendor() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nmax_body_bytes = 1024")
        .start()
        .await;
    let json = [("content-type", "application/json")];
    type Case<'a> = (
        Method,
        String,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            Method::PUT,
            "/nope".into(),
            json.to_vec(),
            EXAMPLE_BODY.into(),
            404,
            "not_found",
        ),
        (
            Method::PUT,
            task_path("not-a-uuid", EXAMPLE_TASK),
            json.to_vec(),
            EXAMPLE_BODY.into(),
            404,
            "not_found",
        ),
        (
            Method::PUT,
            format!("{}/extra", example_path()),
            json.to_vec(),
            EXAMPLE_BODY.into(),
            404,
            "not_found",
        ),
        (
            Method::PUT,
            format!("{}?x=1", example_path()),
            json.to_vec(),
            EXAMPLE_BODY.into(),
            404,
            "not_found",
        ),
        (
            Method::GET,
            example_path(),
            vec![],
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            example_path(),
            json.to_vec(),
            EXAMPLE_BODY.into(),
            405,
            "method_not_allowed",
        ),
        (
            Method::PUT,
            example_path(),
            vec![("content-type", "text/plain")],
            EXAMPLE_BODY.into(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::PUT,
            example_path(),
            vec![],
            EXAMPLE_BODY.into(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::PUT,
            example_path(),
            json.to_vec(),
            vec![b' '; 2048],
            413,
            "payload_too_large",
        ),
        (
            Method::PUT,
            example_path(),
            json.to_vec(),
            b"[1,2]".to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::PUT,
            example_path(),
            json.to_vec(),
            b"{\"a\":".to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::PUT,
            example_path(),
            json.to_vec(),
            b"{} {}".to_vec(),
            400,
            "invalid_json",
        ),
    ];
    for (method, path, headers, body, status, reason) in cases {
        let resp = send(method.clone(), &gw.url(&path), &headers, body).await;
        assert_eq!(resp.status, status, "{method} {path}");
        let v = resp.json();
        assert_eq!(v["code"], status);
        assert_eq!(v["status"], "error");
        assert_eq!(resp.reason(), reason, "{method} {path}");
        if status == 405 {
            assert_eq!(resp.headers["allow"], "PUT");
        }
        let line = gw.access_line(&resp.request_id()).await;
        assert_eq!(line["reason"], reason);
    }
    assert!(vendor.requests().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn upstream_failures_map_to_502_504_and_pass_500_through() {
    // Stopped emulator: a port nobody listens on.
    let gone = vendor().await;
    let gone_url = gone.url();
    gone.stop().await;
    // The residue rule is off so the update itself meets the failures.
    let gw = Gateway::builder(&gone_url).toml(NO_RESIDUE).start().await;
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.reason(), "upstream_unreachable");
    drop(gw);

    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml(NO_RESIDUE)
        .toml("[upstream]\ntimeout_ms = 300")
        .start()
        .await;
    vendor.set_delay(std::time::Duration::from_secs(3));
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.reason(), "upstream_timeout");

    vendor.set_delay(std::time::Duration::ZERO);
    vendor.set_update_fault(Fault::Status(500));
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 500, "the vendor's own 500 passes through");
    assert_eq!(resp.json()["message"], "emulated failure");

    vendor.set_update_fault(Fault::Reset);
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.reason(), "upstream_unreachable");
    assert_eq!(
        vendor.updates().len(),
        3,
        "a request the vendor may have seen is never retried"
    );
    gw.assert_token_never_logged();
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::put(gw.url(&example_path()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            EXAMPLE_BODY.as_bytes(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(vendor.updates().len(), 1);
}

struct TestPki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestPki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

#[tokio::test]
async fn https_upstream_is_verified_against_the_extra_ca() {
    let pki = test_pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = MockOptions {
        token: Some(TOKEN.into()),
        ..MockOptions::default()
    };
    let vendor = MockVendor::start_tls(listener, opts, pki.server.clone())
        .await
        .unwrap();
    let url = format!("https://localhost:{}", vendor.addr.port());

    // Without our CA the certificate is untrusted: 502 and nothing sent.
    let gw = Gateway::builder(&url).toml(NO_RESIDUE).start().await;
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.reason(), "upstream_unreachable");
    assert!(vendor.requests().is_empty());
    drop(gw);

    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &pki.ca_pem).unwrap();
    let gw = Gateway::builder(&url)
        .toml(&format!("[upstream]\nextra_ca_file = {:?}", ca_file.path()))
        .start()
        .await;
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let got = &vendor.updates()[0];
    assert_eq!(got.headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(
        got.version,
        http::Version::HTTP_2,
        "HTTP/2 negotiated by ALPN"
    );
    gw.assert_token_never_logged();
}

#[tokio::test]
async fn token_from_a_file_and_admin_probes() {
    let vendor = vendor().await;
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("  {TOKEN}\n")).unwrap();
    let gw = Gateway::builder(&vendor.url())
        .no_token_env()
        .toml(&format!("[upstream]\ntoken_file = {:?}", token_file.path()))
        .start()
        .await;
    let resp = put(&gw, &example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        vendor.updates()[0].headers["authorization"],
        format!("Bearer {TOKEN}")
    );

    let health = gw.admin_get("/healthz").await;
    assert_eq!(health.status, 200);
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 200);
    gw.assert_token_never_logged();
}

#[tokio::test]
async fn a_vendor_echoing_the_token_does_not_leak_it() {
    let vendor = vendor().await;
    vendor.set_update_fault(Fault::Canned(
        200,
        format!(
            r#"{{"code":200,"status":"success","message":"ok","data":{{"seen":"Bearer {TOKEN}"}}}}"#
        ),
    ));
    let mut gw = Gateway::start(&vendor.url()).await;
    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200);
    assert!(!resp.text().contains(TOKEN), "{}", resp.text());
    assert!(resp.text().contains("Bearer <redacted>"));
    gw.stop().await;
    assert!(
        !std::fs::read_to_string(gw.audit_path())
            .unwrap()
            .contains(TOKEN)
    );
    gw.assert_token_never_logged();
}
