//! `warbler-loadtest`: simulated publishers and subscribers with real encoded media against
//! Warbler (its WebSocket protocol) or Janus VideoRoom (its HTTP API), measuring what users
//! would see (loss, latency, jitter, freezes, time to first packet) and what the SFU spends
//! (CPU and memory from `/proc`). See `README` in this folder and `bench.sh`.

pub mod cli;
pub mod janus;
pub mod measure;
pub mod media;
pub mod report;
pub mod scenario;
pub mod servers;
pub mod sysmon;
pub mod warbler;
pub mod world;
