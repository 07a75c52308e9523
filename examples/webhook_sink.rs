//! A webhook receiver for the benchmark: answers every POST with 204 at
//! once and counts what it got, verifying nothing. `bench/run.sh` attaches
//! it to the write mix (row `write-hooked`) to show what delivering the
//! change feed costs the API's own writes.
//!
//! Usage: `cargo run --release --example webhook_sink -- PORT`. Listens on
//! 127.0.0.1 only; on SIGTERM prints how many deliveries it answered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use warp::Filter;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(3031);
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let routes = warp::post()
        .and(warp::body::bytes())
        .map(move |_: bytes::Bytes| {
            counter.fetch_add(1, Ordering::Relaxed);
            warp::reply::with_status(warp::reply(), warp::http::StatusCode::NO_CONTENT)
        });
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        term.recv().await;
    };
    let server = warp::serve(routes).bind(([127, 0, 0, 1], port)).await;
    eprintln!("webhook_sink: listening on 127.0.0.1:{port}");
    server.graceful(stop).run().await;
    eprintln!(
        "webhook_sink: answered {} deliveries",
        received.load(Ordering::Relaxed)
    );
}
