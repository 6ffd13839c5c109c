//! The `quern` program's library half: configuration and start-up.

pub mod config;
pub mod mgmt;
pub mod startup;
