//! Builds the application that both `main` and the tests start.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;

use crate::auth::{Authority, RevocationList, RootKey};
use crate::config::{creation_problem, Config, ConfigError, Problem};
use crate::http::rate_limit::RateLimits;
use crate::http::server;
use crate::http::AppState;
use crate::store::{self, DatabaseCheck, Store};

mod webhooks;

pub use webhooks::{StoreFeed, StoreLedger};

/// How often the server reads new revocations (a revoked token is refused
/// within this period, plus one read).
pub const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// How often idle rate-limit keys are forgotten (and old events pruned).
const HOUSEKEEPING: Duration = Duration::from_secs(2);

/// How often recorded metrics are folded.
const UPKEEP: Duration = Duration::from_millis(250);

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    revoked: Arc<RevocationList>,
    server: server::Settings,
    /// Tells streams and long polls that the server is stopping.
    stopping: tokio::sync::watch::Sender<bool>,
    retention_days: u32,
    /// The webhooks to deliver to, if any are configured.
    delivery: Option<webhooks::Delivery>,
}

/// What `check` found: everything start-up needs, short of binding.
pub struct Checked {
    /// The root key; `None` when the key file is still to be generated.
    pub key: Option<RootKey>,
    pub database: DatabaseCheck,
}

/// Every check start-up makes short of binding and serving, changing
/// nothing: `check-config` runs it, and `Application::build` runs it first,
/// so the two can never disagree. Every problem found is reported at once
/// (`cli::run` says where each value came from).
pub fn check(config: &Config) -> Result<Checked, ConfigError> {
    let mut problems = Vec::new();
    let key = match RootKey::load(&config.auth) {
        Ok(Some(key)) => Some(key),
        Ok(None) => {
            problems.extend(creation_problem(
                "auth.private_key_file",
                &config.auth.private_key_file,
            ));
            None
        }
        Err(e) => {
            problems.extend(e.problems);
            None
        }
    };
    let database = store::check(&config.database)
        .map_err(|e| problems.extend(e.problems))
        .ok();
    match database {
        Some(database) if problems.is_empty() => Ok(Checked { key, database }),
        _ => Err(ConfigError {
            problems,
            read: Vec::new(),
        }),
    }
}

impl Application {
    /// Checks the configuration (`check`), loads or generates the key,
    /// opens the database and binds the address.
    pub async fn build(config: &Config) -> anyhow::Result<Application> {
        Self::build_with(config, None).await
    }

    /// `build`, with `linkid dev`'s controls turned on when given.
    pub async fn build_with(
        config: &Config,
        dev: Option<crate::http::dev::DevControls>,
    ) -> anyhow::Result<Application> {
        let checked = check(config)?;
        if !config.sources.read.is_empty() {
            tracing::info!(read = %config.sources.read.join(", "), "configuration");
        }
        let key = match checked.key {
            Some(key) => key,
            None => RootKey::load_or_create(&config.auth)?,
        };
        if let Some(path) = &key.generated {
            tracing::info!(path = %path.display(), "generated a new root key (mode 0600); mint tokens with `linkid token mint --admin`");
        }
        match &key.keypair {
            Some(_) => {
                tracing::info!(public_key = %key.public, path = %config.auth.private_key_file.display(), "verifying tokens with the root key in this file")
            }
            None => {
                tracing::info!(public_key = %key.public, "verifying tokens with auth.public_key")
            }
        }
        let delivery = webhooks::Delivery::from_config(config)?;
        let store = Store::open_serving(&config.database, &config.id_rules()).await?;
        tracing::info!(database = %store.describe(), "database ready");
        let revoked = Arc::new(RevocationList::default());
        let server = server::Settings::from_config(&config.server)?;
        let addr = config.server.addr.socket_addr();
        let listener = server::bind(addr).map_err(|e| bind_error(e, config))?;
        let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
        let state = Arc::new(AppState {
            authority: Authority::new(key.public, revoked.clone(), &config.auth),
            store,
            limits: RateLimits::new(&config.rate_limit),
            providers: config.identity_providers.clone(),
            metrics: config.metrics.clone(),
            cors_origins: config.cors.allowed_origins.clone(),
            // An IPv4 peer on a dual-stack listener is ::ffff:a.b.c.d; it
            // is compared in its IPv4 form.
            trusted_proxies: config
                .rate_limit
                .trusted_proxies
                .iter()
                .map(|ip| ip.to_canonical())
                .collect(),
            openapi_json: Bytes::from(crate::http::openapi::document_json()),
            events: config.events.clone(),
            streams: Arc::new(tokio::sync::Semaphore::new(
                config.events.max_streams as usize,
            )),
            stopping: stopping_seen,
            unsent: server.unsent.clone(),
            // One page built per core at a time: more would only wait for
            // the CPU while holding their rows.
            pages: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            dev,
        });
        Ok(Application {
            listener,
            state,
            revoked,
            server,
            stopping,
            retention_days: config.events.retention_days,
            delivery,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` completes, then stops accepting, closes idle
    /// and stalled connections, lets requests in their handlers finish (up
    /// to `server.shutdown_timeout_secs`) and checkpoints the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        crate::telemetry::prometheus();
        let store = self.state.store.clone();
        let mut newest = load_revocations(&store, &self.revoked, 0).await?;
        let engine = self
            .delivery
            .map(|delivery| delivery.start(&store))
            .transpose()?;
        let retention_days = self.retention_days;
        let housekeeping = {
            let state = self.state.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(HOUSEKEEPING);
                let mut last_prune: Option<std::time::Instant> = None;
                loop {
                    every.tick().await;
                    state.limits.forget_idle();
                    if retention_days > 0 && last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY)
                    {
                        last_prune = Some(std::time::Instant::now());
                        prune_events(&state.store, retention_days).await;
                    }
                }
            })
        };
        // Folds recorded histogram samples into their buckets; without it
        // they pile up in memory until a scrape. Often, in small batches, on
        // the blocking pool: a big batch on an async thread would hold up
        // the requests queued behind it.
        let upkeep = tokio::spawn(async {
            let mut every = tokio::time::interval(UPKEEP);
            loop {
                every.tick().await;
                let _ = tokio::task::spawn_blocking(|| crate::telemetry::prometheus().run_upkeep())
                    .await;
            }
        });
        let poller = {
            let store = store.clone();
            let revoked = self.revoked.clone();
            tokio::spawn(async move {
                // Said once when reads start failing and once when they
                // work again, not four times a second through an outage.
                let mut failing = false;
                loop {
                    tokio::time::sleep(REVOCATION_POLL).await;
                    match load_revocations(&store, &revoked, newest).await {
                        Ok(n) => {
                            newest = n;
                            if std::mem::take(&mut failing) {
                                tracing::info!("reading revocations again");
                            }
                        }
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(error = ?e, "cannot read revocations; retrying every {REVOCATION_POLL:?}");
                        }
                        Err(_) => {}
                    }
                    // Events other processes committed wake long polls.
                    if let Err(e) = store.refresh().await {
                        tracing::debug!(error = ?e, "cannot read the newest event");
                    }
                }
            })
        };
        let streams = self.stopping;
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            // Event streams and long polls end now, so draining need not wait for them.
            let _ = streams.send(true);
        };
        server::serve(
            self.listener,
            warp::service(crate::http::app(self.state)),
            self.server,
            signal,
        )
        .await;
        if let Some(engine) = engine {
            // Its leases given up, so another instance takes over at once.
            engine.stop().await;
        }
        poller.abort();
        housekeeping.abort();
        upkeep.abort();
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// An address in use is another process's doing (exit 1: retrying may
/// work); any other refusal is the configuration's (exit 2).
fn bind_error(error: std::io::Error, config: &Config) -> anyhow::Error {
    let addr = &config.server.addr;
    if error.kind() == std::io::ErrorKind::AddrInUse {
        return anyhow::anyhow!(
            "cannot listen on server.addr {addr}: another process listens there ({error}) — stop it, or choose another port (e.g. LINKID_SERVER__ADDR=127.0.0.1:9000)"
        );
    }
    ConfigError::one(Problem::new(
        "server.addr",
        format!("cannot listen on {addr} ({error})"),
        "use an address of this machine (0.0.0.0 for every interface), and a port above 1023 unless the server may bind low ports",
    ))
    .into()
}

/// How often events past `events.retention_days` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

async fn prune_events(store: &Store, retention_days: u32) {
    let cutoff =
        std::time::SystemTime::now() - Duration::from_secs(u64::from(retention_days) * 24 * 3600);
    let cutoff = humantime::format_rfc3339_seconds(cutoff).to_string();
    match store.prune_events(cutoff).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "pruned events past events.retention_days"),
        Err(e) => tracing::warn!(error = ?e, "cannot prune events"),
    }
}

async fn load_revocations(
    store: &Store,
    revoked: &RevocationList,
    after: i64,
) -> anyhow::Result<i64> {
    let (ids, newest) = store.revoked_since(after).await?;
    revoked.extend(ids);
    Ok(newest)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
