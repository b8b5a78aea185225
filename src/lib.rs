//! keygate: a reverse-proxy authentication gateway.
//!
//! Request path: accept (`server`) → route (`router`) → authenticate (`auth`, `keyindex`)
//! → forward (`proxy`) → log. Keys live in redb (`store`) and are managed by `manage`,
//! used by both the CLI (`cli`) and the admin API.

pub mod admin;
pub mod admin_client;
pub mod alloc;
pub mod answer;
pub mod audit;
pub mod auth;
pub mod body;
pub mod clock;
pub mod config;
pub mod direct;
pub mod echo;
pub mod error;
pub mod gateway;
pub mod h1server;
pub mod h1upstream;
pub mod hugepages;
pub mod keyindex;
pub mod keys;
pub mod keystate;
pub mod logging;
pub mod manage;
pub mod metrics;
pub mod prefetch;
pub mod proxy;
pub mod proxyproto;
pub mod ratelimit;
pub mod reload;
pub mod router;
pub mod server;
pub mod store;
pub mod text;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod usage;
pub mod workers;
