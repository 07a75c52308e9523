//! HTTP-level tests: each starts the real application on a real port with a
//! fresh SQLite file and real biscuit tokens.

mod helpers;

mod auth;
mod cli;
mod config;
mod crash;
mod delete;
mod errors;
mod hostile;
mod hostile_tokens;
mod identity_providers;
mod link;
mod list;
mod logs;
mod openapi;
mod ops;
mod races;
mod shutdown;
