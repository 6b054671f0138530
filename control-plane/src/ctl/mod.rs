//! `cellctl`, the ops CLI: what it prints and the exit codes scripts can rely on. The binary
//! (`src/bin/cellctl.rs`) makes the calls; this module turns answers into tables for people or
//! JSON for scripts, and statuses into exit codes.

pub mod exit;
pub mod table;
pub mod views;
