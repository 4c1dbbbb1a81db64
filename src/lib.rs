//! cliproxyapi: a credential server for LLM providers.
//!
//! It keeps API keys and OAuth logins in SQLite, imports `auths/*.json` at start, serves a
//! management API over them and a proxy API that picks, reserves on and rotates across them.
//! README.md is the outside (commands, config keys, routes, JSON shapes); bench/README.md the
//! measurements. The modules depend on each other without cycles
//! (`python3 scripts/module-cycles.py` checks it): `http` and `cli` at the top, then `app`,
//! `jobs` (which only `app` uses) and `state`, the login service (`login`), the request path
//! (`proxy`), `store` and `import`, and below them `oauth`, `notify`, `providers`, `domain`, `quota`, `crypto`, `files`.
//!
//! The crate is also a library for a program that embeds the server: DEV.md shows how
//! (`Application::build_with_flows`, `serve`) with a login and refresh flow of its own for a
//! provider of its config ([`oauth::OauthFlow`], registered with [`oauth::Flows::register`]
//! as copilot's and kiro's are), backed by `examples/custom_flow/`.
//!
//! # Layout
//! - [`cli`]: the command line (`serve`, `import`, `hash-secret`, `gen-key`, `rotate-key`), exit codes.
//! - [`app`]: building the application from a config and serving it; tests use the same path.
//! - [`jobs`]: the background jobs ([`jobs::resets`]: quota resets; [`jobs::refresh`]: the
//!   token refresh worker's check; [`jobs::logins`]: the cleanup of ended logins), plain functions of the state and `now` that
//!   tokio-cron-scheduler runs inside `serve`.
//! - [`refresh`]: the token refresh service: one refresh per credential at a time (shared in
//!   the process, claimed in the database), what a refresh's result does, checks and their
//!   history, the status; over the providers' flows in `oauth`.
//! - [`login`]: device-flow logins (RFC 8628): the sessions (their device codes sealed in the
//!   store), one background poller per pending session, the credential stored on approval,
//!   resuming after a restart, the cleanup of ended sessions; over the flows in `oauth`.
//! - [`state`]: what the application shares (config, store, registry, auth log, clock).
//! - [`config`]: the typed config, loaded from YAML and `CLIPROXY__*` variables, validated.
//! - [`http`]: the HTTP edge; it owns every response and makes no business decision.
//!   - [`http::listener`]: our accept loop with its limits (`connection`, `phase`, `slots`).
//!   - [`http::body`], [`http::extract`]: bodies within their budgets; extractors whose
//!     rejections are our JSON error.
//!   - [`http::error`]: the one JSON error shape, and every request-path error mapped to it.
//!   - [`http::caller`], [`http::guard`] (`ban_table`, `client`, `management`), [`http::bans`]:
//!     who is calling, the management and client-key guards, the ban endpoints.
//!   - [`http::management`], [`http::view`]: the management API and its JSON views.
//!   - [`http::proxy`]: the provider-shaped routes and the lease API, over [`proxy`].
//!   - [`http::oauth`]: the device-flow routes (`/v0/oauth/{provider}/start`, `/status`),
//!     over [`login`].
//! - [`proxy`]: the request path as a service ([`proxy::RequestPath`]): forward, lease, report.
//!   - `attempts`: the one attempt loop; `exchange`: forwarding in stages (prepare, attempt,
//!     deliver); `lease`: leases and reports; `settle`: a reservation from grant to
//!     settlement, and the tapped stream; `error`: [`proxy::PathError`].
//! - [`store`]: the SQLite pools, migrations and every SQL statement.
//!   - `credentials`, `quota`, `import`, `audit`, `secrets`: management-side statements.
//!   - `requests`: the request path's operations; `reservation`: their vocabulary (a leaf).
//!   - `ledger` (`db`, `hot`, `mirror`): the request path's writes committed in groups, and
//!     the in-memory mirror they are decided on.
//! - [`import`]: credential files and bulk bodies into validated new credentials;
//!   [`import::plan`]: what an import does, decided over the store's snapshot.
//! - [`providers`]: the provider registry (built-ins and config blocks), and per format:
//!   [`providers::exchange`] (headers, credential, body), [`providers::wire`] (what is read of
//!   a request and its usage), [`providers::tap`] (usage in a stream), [`providers::classify`]
//!   (what an error answer means), [`providers::json`] (reading bodies without building them).
//! - [`upstream`]: the request path's HTTP client to the providers.
//! - [`domain`]: credentials as the program sees them; [`domain::status`], the one rule for
//!   their effective status; typed ids ([`domain::CredentialId`], [`domain::ReservationId`],
//!   [`domain::ProviderName`]); [`domain::Usage`].
//! - [`quota`]: reset schedules and period arithmetic, pure functions of `now`; token bounds.
//! - [`selection`]: the selection strategies as plain functions.
//! - [`crypto`]: [`crypto::Secret`], sealing (`seal`), fingerprints, password hashes, previews.
//! - [`events`]: the auth event log (`logs/auth.log`).
//! - [`oauth`]: the provider-specific part of an OAuth login and refresh, behind
//!   [`oauth::OauthFlow`]: copilot's token exchange, kiro's AWS SSO OIDC grant, the RFC 6749
//!   refresh grant, and an embedding program's own (DEV.md); [`oauth::Flows`] holds them by
//!   provider; [`oauth::client`] and [`oauth::device`], what they share.
//! - [`notify`]: webhook notifications of credential events: a bounded queue and a delivery
//!   task per webhook, signed bodies ([`notify::queue`]: the queue that drops its oldest).
//! - [`files`]: owner-only files and folders for secrets, and the warning for shared ones.

pub mod app; // Application::build / serve
pub mod cli; // argument parsing and exit codes
pub mod config; // typed config, loading, validation
pub mod crypto; // sealing secrets, fingerprints, redaction
pub mod domain; // credential types shared by store, import and http
pub mod events; // auth event log file
pub mod files; // owner-only files and folders
pub mod http; // axum routers and handlers
pub mod import; // credential files and bodies into new credentials
pub mod jobs; // background jobs on tokio-cron-scheduler: quota resets
pub mod login; // device-flow logins: sessions, background polling, the credential stored
pub mod notify; // webhook notifications of credential events, off the request path
pub mod oauth; // the provider-specific part of an OAuth refresh: copilot, kiro, the RFC 6749 grant
pub mod providers; // which providers exist, and what differs by format
pub mod proxy; // the request path: attempts, rotation, leases, streaming with a usage tap
pub mod quota; // reset schedules, periods
pub mod refresh; // the token refresh service: single-flight refreshes, checks, history
pub mod selection; // the strategies over usable candidates
pub mod state; // AppState and the clock: what the application shares
pub mod store; // the only place that knows SQL
pub mod upstream; // the HTTP client calls to providers go through
