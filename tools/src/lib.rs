//! The tools that prove nginx-graceful, kept out of the supervisor's binary (no TLS, HTTP
//! client or plotting in PID 1).
//!
//! [`soak`] loads a server and classifies every failed request; [`rehearse`] plays a Kubernetes
//! rolling termination on one machine (pods as PID namespaces, a kube-proxy-like Service, the
//! kubelet's order) for this project's strategy and the common recipes, with the supervisor
//! binary built beside it.

pub mod cli;
pub mod error;
pub mod rehearse;
pub mod soak;
