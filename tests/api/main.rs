//! HTTP-level tests: each starts the real application on a real port with a
//! fresh SQLite file and real biscuit tokens.

mod helpers;

mod amplification;
mod auth;
mod cli;
mod config;
mod connections;
mod crash;
mod delete;
mod errors;
mod faults;
mod feed;
mod get;
mod hostile;
mod identity_providers;
mod link;
mod list;
mod logs;
mod openapi;
mod ops;
mod races;
mod search;
mod shutdown;
mod transfer;
mod upgrades;
