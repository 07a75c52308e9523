//! Logging set-up and Prometheus metrics (the `metrics` facade with the
//! Prometheus exporter's recorder; rendered at `GET /metrics`).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};

/// Sets up logging: `log.level` (or `RUST_LOG`) and `log.format`. Lines
/// are written to stderr by a thread of their own, so a request's line
/// costs its thread the formatting, not the write; keep the returned guard
/// until the process ends (dropping it writes what is still queued). When
/// the queue is full, a request waits for room rather than a line being
/// lost.
#[must_use = "dropping the guard stops the log writer"]
pub fn init_tracing(config: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    // warp's own per-request events would double our one line per request.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},warp::filters::trace=off", config.level)));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("linkid-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let _ = match config.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
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
    metrics::describe_counter!(
        "linkid_authorizations_offloaded_total",
        "Authorizations run on the blocking pool because their datalog is not trivially cheap."
    );
    metrics::describe_counter!(
        "linkid_rate_limited_total",
        "Requests answered 429, by limit."
    );
}

/// Records one answered request under its operation's label. Handles are
/// looked up once per (operation, status) and kept, so the hot path only
/// bumps atomics.
pub fn record_request(operation: &'static str, status: u16, elapsed: Duration) {
    type Handles = (metrics::Counter, metrics::Histogram);
    static HANDLES: OnceLock<std::sync::RwLock<HashMap<(&'static str, u16), Handles>>> =
        OnceLock::new();
    let handles = HANDLES.get_or_init(Default::default);
    let key = (operation, status);
    if let Some((counter, histogram)) = handles.read().unwrap_or_else(|e| e.into_inner()).get(&key)
    {
        counter.increment(1);
        histogram.record(elapsed.as_secs_f64());
        return;
    }
    let (counter, histogram) = (
        metrics::counter!("linkid_requests_total", "operation" => operation, "status" => status_label(status)),
        metrics::histogram!("linkid_request_duration_seconds", "operation" => operation),
    );
    counter.increment(1);
    histogram.record(elapsed.as_secs_f64());
    handles
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, (counter, histogram));
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
