//! The integration tests: one binary, a module per area. Each test starts the real server on
//! port 0 with its own temporary folder and database.

#![allow(async_fn_in_trait)]

mod answers;
mod attempts;
mod bad_input;
mod browsers;
mod common;
mod copilot;
mod crash;
mod custom_flow;
mod default_limits;
mod guard;
mod imports;
mod leases;
mod limits;
mod logins;
mod logins_e2e;
mod management;
mod mock;
mod notify;
mod numbers;
mod operations;
mod pages;
mod persistence;
mod provider_mock;
mod proxy;
mod raw;
mod refresh;
mod refresh_bounds;
mod resets;
mod scale;
#[cfg(feature = "sdk-tests")]
mod sdk;
mod secrets;
mod security;
mod seed;
mod soak;
mod stalls;
mod status;
mod streams;
