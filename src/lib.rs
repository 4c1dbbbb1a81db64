//! cliproxyapi: a credential server for LLM providers.
//!
//! It keeps API keys and OAuth logins in SQLite, imports `auths/*.json` at start, and serves a
//! management API over them. The contract (`../shared/docs/contract.md`) is the outside; this
//! crate is organised by the parts of the design, one module each.
//!
//! # Layout
//! - [`cli`]: the command line (`serve`, `import`), exit codes.
//! - [`app`]: building the application from a config and serving it; tests use the same path.
//! - [`state`]: what the application shares (store, registry, auth log, request path, clock).
//! - [`config`]: the typed config, loaded from YAML and `CLIPROXY__*` variables, validated.
//! - [`store`]: the SQLite pool, migrations and every SQL statement.
//! - [`crypto`]: the seal/open seam for secrets, fingerprints, the redacting [`crypto::Secret`].
//! - [`import`]: turning credential files and bulk bodies into validated new credentials.
//! - [`domain`]: credentials as the rest of the program sees them, and the one rule for their
//!   effective status ([`domain::status`]).
//! - [`quota`]: reset schedules and period arithmetic, pure functions of `now`.
//! - [`providers`]: the provider registry (built-ins and config blocks), and per format what a
//!   call carries, where usage is, what an error answer means.
//! - [`proxy`]: the request path as a service ([`proxy::RequestPath`]): forward, lease, report.
//! - [`events`]: the auth event log (`logs/auth.log`).
//! - [`files`]: owner-only files and folders for secrets, and the warning for shared ones.
//! - [`upstream`]: the request path's HTTP client to the providers.
//! - [`http`]: routers, extractors, the one JSON error shape, the management handlers.

pub mod app; // Application::build / serve
pub mod cli; // argument parsing and exit codes
pub mod config; // typed config, loading, validation
pub mod crypto; // sealing secrets, fingerprints, redaction
pub mod domain; // credential types shared by store, import and http
pub mod events; // auth event log file
pub mod files; // owner-only files and folders
pub mod http; // axum routers and handlers
pub mod import; // credential files and bodies into new credentials
pub mod providers; // which providers exist, and what differs by format
pub mod proxy; // the request path: attempts, rotation, leases, streaming with a usage tap
pub mod quota; // reset schedules, periods
pub mod selection; // the strategies over usable candidates
pub mod state; // AppState and the clock: what the application shares
pub mod store; // the only place that knows SQL
pub mod upstream; // the HTTP client calls to providers go through
