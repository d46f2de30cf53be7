//! Subcommands that have grown beyond a function in `main.rs`.

pub mod bench;
pub mod explain;
pub mod run;
