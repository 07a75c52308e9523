//! linkid: a small, fast, trustworthy server for the Linked Identities admin API.

pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod handlers;
pub mod openapi;
pub mod rate_limit;
pub mod routes;
pub mod startup;
pub mod store;
pub mod telemetry;
