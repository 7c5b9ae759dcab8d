//! nginx itself: the command that starts the master, the process tree below it, and the
//! connections its workers hold.

pub mod arrivals;
pub mod command;
pub mod config;
pub mod configured_pid_file;
pub mod connections;
pub mod generations;
pub mod log;
pub mod pidfd;
pub mod pidfile;
pub mod sock_diag;
pub mod tree;
