//! The key-lifecycle tests (`tests.rs`), run on each metadata store backend: the SQLite file
//! of a single daemon and a PostgreSQL database (one set of tests for both, so the two cannot
//! drift apart).

// The same tests, twice, on purpose: once per backend.
#![allow(clippy::duplicate_mod)]

use crate::common::DevDaemon;

#[path = "tests.rs"]
mod on_sqlite;

#[path = "tests.rs"]
mod on_postgres;

/// The daemon for the tests of the module at `module` (its `module_path!()`).
fn daemon_for(module: &str) -> DevDaemon {
    if module.ends_with("::on_postgres") {
        DevDaemon::start_on_postgres()
    } else {
        DevDaemon::start()
    }
}
