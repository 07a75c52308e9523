//! A receiver on loopback for the engine's tests: raw HTTP/1.1 over TCP, so
//! that a test can make it answer anything — any status, a body that never
//! ends, no answer at all — and see every request it was sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::config::ReceiverUrl;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Header names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the receiver does with a request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A complete answer; the connection is closed after it.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Nothing, with the connection kept open.
    Hang,
    /// This status, then a body that never ends.
    Endless(u16),
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer::Full {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Answer {
        if let Answer::Full { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }

    pub fn body(mut self, text: &str) -> Answer {
        if let Answer::Full { body, .. } = &mut self {
            *body = text.as_bytes().to_vec();
        }
        self
    }
}

type Handler = dyn Fn(&Request) -> Answer + Send + Sync;

/// A receiver listening on 127.0.0.1; it stops when dropped.
pub struct Receiver {
    addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver that answers each request with `handler`'s answer.
    pub async fn start(handler: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, handler.clone(), seen.clone()));
            }
        });
        Receiver {
            addr,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> ReceiverUrl {
        crate::config::WebhookUrl::new(format!("http://{}/hook", self.addr))
            .parse()
            .unwrap()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `count` requests have come, or fails the test.
    pub async fn wait_for(&self, count: usize, within: Duration) -> Vec<Request> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let requests = self.requests();
            if requests.len() >= count {
                return requests;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {count} requests came within {within:?}",
                requests.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, handler: Arc<Handler>, seen: Arc<Mutex<Vec<Request>>>) {
    let mut stream = BufReader::new(stream);
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let answer = handler(&request);
    seen.lock().unwrap().push(request);
    let stream = stream.get_mut();
    match answer {
        Answer::Full {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        }
        Answer::Hang => tokio::time::sleep(Duration::from_secs(120)).await,
        Answer::Endless(status) => {
            let head = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 16 * 1024];
            while stream.write_all(&chunk).await.is_ok() {}
        }
    }
}

async fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    stream.read_line(&mut line).await.ok()?;
    let method = line.split(' ').next()?.to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        stream.read_line(&mut line).await.ok()?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(Request {
        method,
        headers,
        body,
    })
}
