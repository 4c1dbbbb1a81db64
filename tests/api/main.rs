//! The integration tests: one binary, a module per area. Each test starts the real server on
//! port 0 with its own temporary folder and database.

#![allow(async_fn_in_trait)]

mod bad_input;
mod common;
mod crash;
mod limits;
mod management;
mod mock;
mod persistence;
mod proxy;
mod raw;
#[cfg(feature = "sdk-tests")]
mod sdk;
mod secrets;
mod security;
mod seed;
mod soak;
