//! The operating system's edge: signals in, zombies reaped, files the supervisor owns, hook
//! processes, and the config watch.

pub mod config_watch;
pub mod drain_flag;
pub mod hooks;
pub mod lines;
pub mod reaper;
pub mod runtime_dir;
pub mod signals;
pub mod small_file;
