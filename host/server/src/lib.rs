//! kframe-server: the OpenAI-compatible HTTP endpoint over an engine it is given
//! (`kframe serve`, or an embedder's own).
//!
//! # Layout
//!
//! - [`openai`]: the wire format, chat templates and stop sequences.
//! - [`http`]: bodies, errors, bounded reads.
//! - `app`: [`App`], what every handler reads. `completion`: the one completion
//!   path, folding the engine's events into a JSON or a server-sent-events sink.
//!   `routes`: one function per endpoint. `listener`: [`serve`], connections and
//!   graceful shutdown. `sync`: registry changes (this replica's and others')
//!   applied to the engine, and the follower of a shared registry.
//!
//! A request flows one way: connection (bounded in number, header and body
//! timeouts) -> route -> bearer token -> tenant record -> prompt tokens ->
//! [`Engine::submit`] -> events -> JSON or server-sent events.
//!
//! # Dependencies
//!
//! kframe-engine (and the core, model and policy types it speaks),
//! kframe-registry (tenants, in redb or PostgreSQL), hyper, minijinja. Modules
//! point one way: http, openai <- app <- sync, completion <- routes <- listener
//! <- this file.

mod app;
mod completion;
pub mod http;
mod listener;
pub mod openai;
mod routes;
mod sync;

pub use app::{App, Limits, Replica, Served, ServerError, ADMIN_TOKEN_FILE};
pub use listener::serve;
