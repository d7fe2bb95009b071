//! One file per scenario; each runs its measurements for every peer, repeating them and
//! interleaving the peers so that noise from other work on the machine hits all alike.

pub mod handoff;
pub mod latency;
pub mod memory;
pub mod setup;
pub mod throughput;
