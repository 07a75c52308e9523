//! HTTP-level tests: each starts the real application on a real port with a
//! fresh database and real biscuit tokens. `LINKID_TEST_BACKEND` picks the
//! store: `sqlite` (the default) or `postgres` (a database per test on the
//! server at `LINKID_TEST_PG_URL`; see helpers.rs).

mod helpers;

mod amplification;
mod auth;
mod cli;
mod config;
mod conform;
mod connections;
mod crash;
mod delete;
mod dev;
mod dev_controls;
mod errors;
mod faults;
mod feed;
mod first_start;
mod freshness;
mod get;
mod group_commit;
mod hostile;
mod hostile_tokens;
mod identity_providers;
mod instances;
mod lapsed_tokens;
mod link;
mod list;
mod logs;
mod openapi;
mod ops;
mod races;
mod search;
mod shutdown;
mod slow_readers;
mod transfer;
mod upgrades;
mod webhook_engine;
mod webhooks;
