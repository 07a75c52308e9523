//! Logging set-up and Prometheus metrics (the `metrics` facade with the
//! Prometheus exporter's recorder; rendered at `GET /metrics`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};

mod log_writer;

pub use log_writer::LogGuard;
use log_writer::LogWriter;

/// Sets up logging: `log.level` (or `RUST_LOG`) and `log.format`. Lines
/// are written to stderr by a thread of their own (see `log_writer`), so a
/// request's line costs its thread the formatting and a copy, not the
/// write; keep the returned guard until the process ends (dropping it
/// writes what is still buffered). No line is ever dropped.
#[must_use = "dropping the guard stops the log writer"]
pub fn init_tracing(config: &LogConfig) -> Option<LogGuard> {
    use tracing_subscriber::EnvFilter;
    // warp's own per-request events would double our one line per request.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},warp::filters::trace=off", config.level)));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Ok((writer, guard)) = LogWriter::start(std::io::stderr()) else {
        // No thread for the writer: each line is written where it is made.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        let _ = match config.format {
            LogFormat::Json => builder.json().try_init(),
            LogFormat::Text => builder.try_init(),
        };
        return None;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer.clone());
    let installed = match config.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // Colours are for people at a terminal: those lines stay tracing's.
    if installed.is_ok() && !ansi {
        let _ = REQUEST_LOG.set(RequestLog {
            writer,
            json: matches!(config.format, LogFormat::Json),
        });
    }
    Some(guard)
}

/// Where request lines go when this process set up logging itself.
struct RequestLog {
    writer: LogWriter,
    json: bool,
}

static REQUEST_LOG: OnceLock<RequestLog> = OnceLock::new();

/// What one request's log line says. Every value is plain ASCII that needs
/// no escaping: a method hyper parsed, a route template, a request id that
/// passed `is_sane_request_id` or was made here, a token's log id.
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub latency_us: u64,
    pub request_id: &'a str,
    pub token: &'a str,
}

/// Logs one request at info under the target `linkid::request`: the line
/// tracing's formatter would write, in the configured format, but made
/// here from the values — the request line is the one line per request,
/// and tracing's field visitors and timestamp formatting cost more than
/// the rest of a cached read.
pub fn log_request(line: &RequestLine<'_>) {
    if !tracing::enabled!(target: "linkid::request", tracing::Level::INFO) {
        return;
    }
    let Some(log) = REQUEST_LOG.get() else {
        tracing::info!(
            target: "linkid::request",
            method = line.method,
            route = line.route,
            status = line.status,
            latency_us = line.latency_us,
            request_id = line.request_id,
            token = line.token,
            "request"
        );
        return;
    };
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        buffer.clear();
        format_request_line(&mut buffer, std::time::SystemTime::now(), line, log.json);
        log.writer.append(&buffer);
    });
}

/// The request line as tracing's `fmt` layer writes it (text: timestamp,
/// padded level, target, message, `name=value` fields; JSON: one object).
fn format_request_line(
    out: &mut Vec<u8>,
    now: std::time::SystemTime,
    line: &RequestLine<'_>,
    json: bool,
) {
    let mut status = itoa::Buffer::new();
    let mut latency = itoa::Buffer::new();
    let (status, latency) = (status.format(line.status), latency.format(line.latency_us));
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_timestamp(out, now);
        let parts: [&[u8]; 13] = [
            b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"method\":\"",
            line.method.as_bytes(),
            b"\",\"route\":\"",
            line.route.as_bytes(),
            b"\",\"status\":",
            status.as_bytes(),
            b",\"latency_us\":",
            latency.as_bytes(),
            b",\"request_id\":\"",
            line.request_id.as_bytes(),
            b"\",\"token\":\"",
            line.token.as_bytes(),
            b"\"},\"target\":\"linkid::request\"}\n",
        ];
        parts.iter().for_each(|part| out.extend_from_slice(part));
    } else {
        write_timestamp(out, now);
        let parts: [&[u8]; 13] = [
            b"  INFO linkid::request: request method=",
            line.method.as_bytes(),
            b" route=",
            line.route.as_bytes(),
            b" status=",
            status.as_bytes(),
            b" latency_us=",
            latency.as_bytes(),
            b" request_id=",
            line.request_id.as_bytes(),
            b" token=",
            line.token.as_bytes(),
            b"\n",
        ];
        parts.iter().for_each(|part| out.extend_from_slice(part));
    }
}

/// `2026-11-30T10:39:00.123456Z`, as tracing's default timer writes it.
/// A clock outside what RFC 3339 can write (before 1970, after 9999) is
/// written as the nearest time it can: humantime panics on the one and
/// refuses the other, and a log line must not do either.
fn write_timestamp(out: &mut Vec<u8>, now: std::time::SystemTime) {
    use std::io::Write;
    const LAST: Duration = Duration::from_micros(253_402_300_799_999_999);
    let now = now.clamp(std::time::UNIX_EPOCH, std::time::UNIX_EPOCH + LAST);
    // Writing to a `Vec` cannot fail, and the clamp keeps humantime's within range.
    let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ])
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by an embedding
        // program); then our figures go there.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    metrics::describe_counter!(
        "linkid_requests_total",
        "HTTP requests by operation and status."
    );
    metrics::describe_histogram!(
        "linkid_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from routing to response, by operation."
    );
    metrics::describe_gauge!("linkid_links_stored", "Linked identities in the database.");
    metrics::describe_gauge!(
        "linkid_db_pool_connections",
        "Open read connections in the pool."
    );
    metrics::describe_gauge!(
        "linkid_db_pool_idle_connections",
        "Idle read connections in the pool."
    );
    metrics::describe_histogram!(
        "linkid_write_batch_size",
        "Writes that shared one transaction and one fsync (group commit)."
    );
    metrics::describe_counter!(
        "linkid_token_cache_hits_total",
        "Tokens found verified in the cache."
    );
    metrics::describe_counter!(
        "linkid_token_cache_misses_total",
        "Tokens whose signature had to be checked."
    );
    metrics::describe_gauge!(
        "linkid_token_cache_entries",
        "Verified tokens in the cache."
    );
    metrics::describe_gauge!(
        "linkid_token_cache_bytes",
        metrics::Unit::Bytes,
        "Estimated memory of the tokens in the cache (bounded by auth.token_cache_bytes)."
    );
    metrics::describe_gauge!(
        "linkid_unsent_answer_bytes",
        metrics::Unit::Bytes,
        "Bytes of answers made and not yet taken by their clients' sockets (bounded by server.max_unsent_bytes)."
    );
    metrics::describe_counter!(
        "linkid_authorizations_offloaded_total",
        "Authorizations run on the blocking pool because their datalog is not trivially cheap."
    );
    metrics::describe_counter!(
        "linkid_rate_limited_total",
        "Requests answered 429, by limit."
    );
    metrics::describe_counter!(
        "linkid_webhook_deliveries_total",
        "Webhook delivery attempts, by webhook id and outcome (delivered, gone, rejected, redirected, timeout, unreachable, failed)."
    );
    metrics::describe_gauge!(
        "linkid_webhook_pending_events",
        "Events in the change feed after the last one a webhook delivered or skipped, by webhook id (0 on an instance that does not deliver it)."
    );
}

/// One attempt at a webhook delivery, by how it ended (`Outcome::label`).
/// Labelled by the webhook's id only: never its URL.
pub fn webhook_attempt(webhook: &str, outcome: &'static str) {
    prometheus();
    metrics::counter!(
        "linkid_webhook_deliveries_total",
        "webhook" => webhook.to_string(),
        "outcome" => outcome
    )
    .increment(1);
}

/// How many events wait for a webhook (see `linkid_webhook_pending_events`).
pub fn webhook_pending(webhook: &str, pending: u64) {
    prometheus();
    metrics::gauge!("linkid_webhook_pending_events", "webhook" => webhook.to_string())
        .set(pending as f64);
}

/// Records one answered request under its operation's label. Each thread
/// keeps the handles it has used, found by the label's address and the
/// status, so the hot path takes no lock, hashes nothing and only bumps
/// atomics.
pub fn record_request(operation: &'static str, status: u16, elapsed: Duration) {
    type Handles = (metrics::Counter, metrics::Histogram);
    thread_local! {
        static HANDLES: std::cell::RefCell<Vec<((usize, u16), Handles)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    let key = (operation.as_ptr() as usize, status);
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        let at = match handles.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                prometheus();
                handles.push((
                    key,
                    (
                        metrics::counter!("linkid_requests_total", "operation" => operation, "status" => status_label(status)),
                        metrics::histogram!("linkid_request_duration_seconds", "operation" => operation),
                    ),
                ));
                handles.len() - 1
            }
        };
        let (counter, histogram) = &handles[at].1;
        counter.increment(1);
        histogram.record(elapsed.as_secs_f64());
    });
}

/// A token found verified in the cache.
pub fn token_cache_hit() {
    static HITS: OnceLock<metrics::Counter> = OnceLock::new();
    HITS.get_or_init(|| {
        prometheus();
        metrics::counter!("linkid_token_cache_hits_total")
    })
    .increment(1);
}

/// A token whose signature had to be checked.
pub fn token_cache_miss() {
    static MISSES: OnceLock<metrics::Counter> = OnceLock::new();
    MISSES
        .get_or_init(|| {
            prometheus();
            metrics::counter!("linkid_token_cache_misses_total")
        })
        .increment(1);
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        302 => "302",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn line() -> RequestLine<'static> {
        RequestLine {
            method: "GET",
            route: "/api/admin/users/v4/users/{user_id}/linked-identities",
            status: 200,
            latency_us: 1234,
            request_id: "0f9d4a1e-7c1b-4c8e-9f00-1b2c3d4e5f60",
            token: "a1b2c3d4e5f60718",
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds_in_utc() {
        let at = |secs: u64, micros: u64| {
            let mut out = Vec::new();
            write_timestamp(
                &mut out,
                UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros),
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_035_140, 123_456), "2026-11-30T10:39:00.123456Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }

    #[test]
    fn a_clock_outside_rfc3339_writes_the_nearest_time_it_can() {
        let at = |time| {
            let mut out = Vec::new();
            write_timestamp(&mut out, time);
            String::from_utf8(out).unwrap()
        };
        let years = Duration::from_secs(20_000 * 366 * 86_400);

        assert_eq!(at(UNIX_EPOCH - years), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(UNIX_EPOCH + years), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn the_request_line_is_what_tracing_writes_in_either_format() {
        let now = UNIX_EPOCH + Duration::from_micros(1_796_035_140_123_456);
        let mut text = Vec::new();
        format_request_line(&mut text, now, &line(), false);
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "2026-11-30T10:39:00.123456Z  INFO linkid::request: request method=GET \
             route=/api/admin/users/v4/users/{user_id}/linked-identities status=200 \
             latency_us=1234 request_id=0f9d4a1e-7c1b-4c8e-9f00-1b2c3d4e5f60 token=a1b2c3d4e5f60718\n"
        );
        let mut json = Vec::new();
        format_request_line(&mut json, now, &line(), true);
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "timestamp": "2026-11-30T10:39:00.123456Z",
                "level": "INFO",
                "fields": {
                    "message": "request",
                    "method": "GET",
                    "route": "/api/admin/users/v4/users/{user_id}/linked-identities",
                    "status": 200,
                    "latency_us": 1234,
                    "request_id": "0f9d4a1e-7c1b-4c8e-9f00-1b2c3d4e5f60",
                    "token": "a1b2c3d4e5f60718",
                },
                "target": "linkid::request",
            })
        );
        assert!(json.ends_with(b"}\n"));
    }
}
