//! linkid: a small, fast, trustworthy server for the Linked Identities admin API.
//!
//! Arrows point down: `cli` and `startup` build the app from `http`, which
//! uses `auth` and `store`, which use `domain`, `config` and `telemetry`.
//! `conform` (the HTTP client that judges other servers) sits beside
//! `http`, under `cli`: it reads the domain types and the OpenAPI document.
//! `webhooks` (the change feed pushed to receivers) sits beside `http`,
//! under `startup`: it uses `domain`, `config` and `telemetry`, and reads
//! the store only through its own two traits.

pub mod auth;
pub mod cli;
pub mod config;
pub(crate) mod conform;
pub mod domain;
pub(crate) mod http;
pub mod startup;
pub mod store;
pub(crate) mod telemetry;
pub mod webhooks;
