//! The `quern` program: the TOML configuration, the running engine and its
//! objects, the durable state directory, and the management API with its
//! command-line client.

pub mod config;
pub mod ctl;
pub mod engine;
pub mod metrics;
pub mod mgmt;
pub mod rpc;
pub mod state;
pub mod sys;
pub mod top;
