//! The benchmark baseline: the smallest warp 0.4 server that answers every
//! GET with a fixed JSON body the size of a one-item linked-identities list
//! (205 bytes, the size linkid returns for a seeded user such as
//! `seed-user-1233`). No auth, no database, no logging: the limit of the
//! machine for this kind of response, against which `bench/run.sh` compares
//! linkid.
//!
//! Usage: `cargo run --release --example baseline -- [PORT]`
//! (or `BASELINE_PORT=PORT`; default 3030). Listens on 127.0.0.1 only.

use warp::http::header::{HeaderValue, CONTENT_TYPE};
use warp::reply::Response;
use warp::Filter;

/// Same shape and length as linkid's answer for one seeded user.
const BODY: &str = concat!(
    r#"{"linked_identities":[{"provider_id":"azure-ad","linked_user_id":"seed-remote-1233","#,
    r#""linked_username":"seed-user-1233@example.com","created_at":"2026-11-29T10:00:00Z","#,
    r#""updated_at":"2026-11-29T10:00:00Z"}]}"#
);

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("BASELINE_PORT").ok())
        .map(|p| {
            p.parse()
                .expect("the port must be a number from 0 to 65535")
        })
        .unwrap_or(3030);
    let routes = warp::get().map(|| {
        let mut response = Response::new(BODY.into());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    });
    let server = warp::serve(routes).bind(([127, 0, 0, 1], port)).await;
    eprintln!(
        "baseline: listening on 127.0.0.1:{port} ({} byte body)",
        BODY.len()
    );
    server.run().await;
}
