//! The domain core: what a drain is and what the supervisor decides. Pure: no clock, no I/O,
//! tested with tables.

pub mod close_spread;
pub mod outcome;
pub mod phase;
pub mod plan;
pub mod policy;
pub mod quiet;
