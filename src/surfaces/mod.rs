//! What others see of the supervisor: the control socket (`drain`, `reload`, `status`), the
//! health and metrics listener, and the shared record of the supervisor's state they read.

pub mod control_client;
pub mod control_socket;
pub mod health;
pub mod live;
pub mod metrics;
pub mod status;
