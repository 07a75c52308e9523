//! Builds the application that both `main` and the tests start.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;

use crate::auth::{Authority, RevocationList, RootKey};
use crate::config::Config;
use crate::http::rate_limit::RateLimits;
use crate::http::AppState;
use crate::store::Store;

/// How often the server reads new revocations (a revoked token is refused
/// within this period, plus one read).
pub const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// How often metrics are folded and idle rate-limit keys forgotten.
const HOUSEKEEPING: Duration = Duration::from_secs(2);

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    revoked: Arc<RevocationList>,
    shutdown_timeout: Duration,
}

impl Application {
    /// Loads the key, opens the database and binds the address.
    pub async fn build(config: &Config) -> anyhow::Result<Application> {
        let key = RootKey::load_or_create(&config.auth)?;
        if let Some(path) = &key.generated {
            tracing::info!(path = %path.display(), "generated a new root key (mode 0600); mint tokens with `linkid token mint --admin`");
        }
        tracing::info!(public_key = %key.public, "verifying tokens with this root public key");
        let store = Store::open(&config.database).await?;
        tracing::info!(database = %store.describe(), "database ready");
        let revoked = Arc::new(RevocationList::default());
        let listener = TcpListener::bind(config.server.addr)
            .await
            .with_context(|| format!("cannot listen on server.addr {}", config.server.addr))?;
        let state = Arc::new(AppState {
            authority: Authority::new(key.public, revoked.clone(), &config.auth),
            store,
            limits: RateLimits::new(&config.rate_limit),
            providers: config.identity_providers.clone(),
            metrics: config.metrics.clone(),
            cors_origins: config.cors.allowed_origins.clone(),
            trusted_proxies: config.rate_limit.trusted_proxies.clone(),
            openapi_json: Bytes::from(crate::http::openapi::document_json()),
        });
        Ok(Application {
            listener,
            state,
            revoked,
            shutdown_timeout: Duration::from_secs(config.server.shutdown_timeout_secs),
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

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish (up to `server.shutdown_timeout_secs`) and
    /// checkpoints the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        crate::telemetry::prometheus();
        let store = self.state.store.clone();
        let mut newest = load_revocations(&store, &self.revoked, 0).await?;
        let housekeeping = {
            let state = self.state.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(HOUSEKEEPING);
                loop {
                    every.tick().await;
                    // Folds recorded histogram samples into their buckets;
                    // without it they pile up in memory until a scrape.
                    crate::telemetry::prometheus().run_upkeep();
                    state.limits.forget_idle();
                }
            })
        };
        let poller = {
            let store = store.clone();
            let revoked = self.revoked.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REVOCATION_POLL).await;
                    match load_revocations(&store, &revoked, newest).await {
                        Ok(n) => newest = n,
                        Err(e) => tracing::warn!(error = ?e, "cannot read revocations"),
                    }
                }
            })
        };
        let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stopping.send(());
        };
        let server = warp::serve(crate::http::app(self.state))
            .incoming(self.listener)
            .graceful(signal)
            .run();
        let timeout = self.shutdown_timeout;
        tokio::select! {
            () = server => {}
            () = async { if stopped.await.is_ok() { tokio::time::sleep(timeout).await } else { std::future::pending().await } } => {
                tracing::warn!("in-flight requests did not finish in {timeout:?}; stopping anyway");
            }
        }
        poller.abort();
        housekeeping.abort();
        store.close().await;
        tracing::info!("stopped");
        Ok(())
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
