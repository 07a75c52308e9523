//! The webhook engine against real receivers on loopback: a warp server
//! that keeps its connections alive, and a Python receiver that verifies
//! each delivery with the Standard Webhooks reference library. The engine
//! runs on the in-memory ledger and feed; the store's adapters and the
//! end-to-end tests through `linkid serve` come with the store's side.

use std::collections::HashSet;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use linkid::config::{SigningSecrets, Start, Webhook, WebhookUrl};
use linkid::domain::{Event, EventType};
use linkid::webhooks::{
    message_type, sign, Backoff, DeliverySettings, Engine, MemoryFeed, MemoryLedger,
};

/// Long enough for hundreds of deliveries on a busy machine.
const PATIENCE: Duration = Duration::from_secs(120);

const NEW_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const OLD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYqr";

/// These tests use no store: the SQLite pass runs them, the PostgreSQL
/// pass need not run them again.
fn store_pass_only() -> bool {
    std::env::var("LINKID_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

fn settings() -> DeliverySettings {
    DeliverySettings {
        timeout: Duration::from_secs(5),
        backoff: Backoff {
            first: Duration::from_millis(5),
            max: Duration::from_millis(20),
        },
        ca_file: None,
        lease_ttl: Duration::from_secs(10),
        check_every: Duration::from_secs(3),
        batch: 100,
    }
}

fn webhook(url: &str, secrets: &str) -> Webhook {
    Webhook {
        id: "receiver".into(),
        url: WebhookUrl::new(url).parse().unwrap(),
        secrets: SigningSecrets::parse(secrets).unwrap(),
        events: None,
        providers: None,
        start: Start::Beginning,
    }
}

fn feed_of(count: usize) -> Arc<MemoryFeed> {
    let feed = Arc::new(MemoryFeed::new());
    let types = [EventType::Linked, EventType::Updated, EventType::Unlinked];
    for i in 0..count {
        feed.record(types[i % 3], &format!("user-{i}"), "okta");
    }
    feed
}

/// The body Standard Webhooks receivers get for `event`: the feed's event
/// object, byte for byte, in `data`.
fn expected_body(event: &Event) -> Vec<u8> {
    format!(
        r#"{{"type":"{}","timestamp":"{}","data":{}}}"#,
        message_type(event.event_type),
        event.occurred_at,
        serde_json::to_string(event).unwrap()
    )
    .into_bytes()
}

async fn delivered_through(ledger: &MemoryLedger, seq: i64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ledger.get("receiver").is_none_or(|s| s.delivered_seq < seq) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stands at {:?}",
            ledger.get("receiver")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request as the warp receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: i64,
    signature: String,
    body: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_events_reach_a_keep_alive_receiver_in_order_signed_and_whole() {
    use warp::Filter;
    if store_pass_only() {
        return;
    }
    // The first attempt at every 50th event is refused.
    let received = Arc::new(Mutex::new(Vec::<Received>::new()));
    let refused = Arc::new(Mutex::new(HashSet::<String>::new()));
    let (seen, refusals) = (received.clone(), refused.clone());
    let routes = warp::post()
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .map(move |headers: warp::http::HeaderMap, body: bytes::Bytes| {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let id = header("webhook-id");
            seen.lock().unwrap().push(Received {
                id: id.clone(),
                timestamp: header("webhook-timestamp").parse().unwrap_or(0),
                signature: header("webhook-signature"),
                body: body.to_vec(),
            });
            let seq: i64 = id.trim_start_matches("evt_").parse().unwrap_or(0);
            let status = if seq % 50 == 0 && refusals.lock().unwrap().insert(id) {
                warp::http::StatusCode::SERVICE_UNAVAILABLE
            } else {
                warp::http::StatusCode::NO_CONTENT
            };
            warp::reply::with_status(warp::reply(), status)
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
    let feed = feed_of(500);
    let ledger = Arc::new(MemoryLedger::new());

    let engine = Engine::start(
        vec![webhook(&format!("http://{addr}/hooks"), NEW_SECRET)],
        settings(),
        ledger.clone(),
        feed.clone(),
    )
    .unwrap();
    delivered_through(&ledger, 500).await;
    engine.stop().await;
    server.abort();

    let received = received.lock().unwrap().clone();
    let mut expected_ids = Vec::new();
    for seq in 1..=500 {
        expected_ids.push(format!("evt_{seq}"));
        if seq % 50 == 0 {
            expected_ids.push(format!("evt_{seq}"));
        }
    }
    let ids: Vec<&str> = received.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids, expected_ids,
        "in order, each refused one again at once"
    );
    let events = feed.events();
    let key = SigningSecrets::parse(NEW_SECRET).unwrap();
    let key = key.iter().next().unwrap().expose();
    for request in &received {
        let seq: usize = request.id.trim_start_matches("evt_").parse().unwrap();
        assert_eq!(
            request.body,
            expected_body(&events[seq - 1]),
            "{}",
            request.id
        );
        assert_eq!(
            request.signature,
            sign(key, &request.id, request.timestamp, &request.body),
            "{}",
            request.id
        );
    }
}

/// The Python receiver, stopped when dropped.
struct PythonReceiver {
    child: std::process::Child,
    port: u16,
}

impl Drop for PythonReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test environment's Python with `standardwebhooks` (scripts/test.sh
/// makes `.venv` from tests/contract/requirements.txt), if there is one.
fn python_with_standardwebhooks() -> Option<std::path::PathBuf> {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let found = std::process::Command::new(&python)
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some(python)
}

fn start_python_receiver(
    python: &std::path::Path,
    secret: &str,
    out: &std::path::Path,
) -> PythonReceiver {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract/webhook_receiver.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .arg(secret)
        .arg(out)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("the receiver printed {line:?}, not its port")
    });
    PythonReceiver { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_webhooks_python_library_verifies_every_delivery_by_either_secret() {
    if store_pass_only() {
        return;
    }
    let Some(python) = python_with_standardwebhooks() else {
        assert!(
            !crate::helpers::venv_is_required(),
            "CI must run this: .venv lacks standardwebhooks (tests/contract/requirements.txt)"
        );
        eprintln!("skipped: no .venv with standardwebhooks (scripts/test.sh makes it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("received.jsonl");
    // The receiver knows only the old secret: linkid signs with both.
    let receiver = start_python_receiver(&python, OLD_SECRET, &out);
    let feed = feed_of(300);
    let ledger = Arc::new(MemoryLedger::new());

    let engine = Engine::start(
        vec![webhook(
            &format!("http://127.0.0.1:{}/linkid", receiver.port),
            &format!("{NEW_SECRET}\n{OLD_SECRET}\n"),
        )],
        settings(),
        ledger.clone(),
        feed.clone(),
    )
    .unwrap();
    delivered_through(&ledger, 300).await;
    engine.stop().await;
    drop(receiver);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().all(|l| l["verified"] == true),
        "every delivery verifies: {:?}",
        lines.iter().find(|l| l["verified"] != true)
    );
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    let expected: Vec<String> = (1..=300).map(|s| format!("evt_{s}")).collect();
    assert_eq!(ids, expected);
    use base64::Engine as _;
    for (line, event) in lines.iter().zip(feed.events()) {
        let body = base64::engine::general_purpose::STANDARD
            .decode(line["body"].as_str().unwrap())
            .unwrap();
        assert_eq!(body, expected_body(&event), "{}", line["id"]);
    }
}

/// A throwaway CA and a certificate it signed for 127.0.0.1, made with
/// openssl (as scripts/pg-cluster.sh makes the test database's): `ca.pem`,
/// `server.pem`, `server.key` in `dir`.
fn private_ca(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-sha256",
    ];
    openssl(
        &[
            &["req", "-x509", "-new"][..],
            &ec,
            &["-days", "2", "-keyout", "ca.key", "-out", "ca.pem"],
            &["-subj", "/CN=linkid webhook test CA (throwaway)"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "0x1f2e3d4c5b6a7988",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}

/// An https receiver on 127.0.0.1 with `server.pem`: answers 204 and
/// records each webhook-id.
async fn tls_receiver(
    dir: &std::path::Path,
    seen: Arc<Mutex<Vec<String>>>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certificates = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certificates, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut stream) = acceptor.accept(stream).await else {
                continue;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            let mut body = vec![0; header("content-length:").parse().unwrap_or(0)];
            let _ = stream.read_exact(&mut body).await;
            seen.lock().unwrap().push(header("webhook-id:"));
            let _ = stream
                .write_all(
                    b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            let _ = stream.shutdown().await;
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_certificate_a_private_ca_signed_is_trusted_through_ca_file() {
    if store_pass_only() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    private_ca(dir.path());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (port, server) = tls_receiver(dir.path(), seen.clone()).await;
    let url = format!("https://127.0.0.1:{port}/hooks");
    let feed = feed_of(3);
    let (trusting, untrusting) = (Arc::new(MemoryLedger::new()), Arc::new(MemoryLedger::new()));

    let with_ca = Engine::start(
        vec![webhook(&url, NEW_SECRET)],
        DeliverySettings {
            ca_file: Some(dir.path().join("ca.pem")),
            ..settings()
        },
        trusting.clone(),
        feed.clone(),
    )
    .unwrap();
    delivered_through(&trusting, 3).await;
    with_ca.stop().await;
    let without_ca = Engine::start(
        vec![webhook(&url, NEW_SECRET)],
        settings(),
        untrusting.clone(),
        feed,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while untrusting.get("receiver").is_none_or(|s| s.attempts == 0) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    without_ca.stop().await;
    server.abort();

    assert_eq!(*seen.lock().unwrap(), ["evt_1", "evt_2", "evt_3"]);
    let refused = untrusting.get("receiver").unwrap();
    assert_eq!(refused.delivered_seq, 0);
    let error = refused.last_error.unwrap();
    assert!(error.contains("certificate"), "{error}");
}
