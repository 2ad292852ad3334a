//! Warbler's media engine: a selective forwarding unit on the webrtc-rs `rtc` sans-IO stack.
//!
//! The core ([`engine::Engine`]) takes every input with the current time and never touches a
//! socket or the clock; [`shell`] owns the UDP sockets and drives it on a dedicated thread.

#![forbid(unsafe_code)]

pub mod allocator;
pub mod api;
pub mod bwe;
pub mod demux;
pub mod engine;
pub mod forwarder;
pub mod ids;
pub mod metrics;
pub mod munger;
pub mod packet_cache;
pub mod rtc_setup;
pub mod seq;
pub mod shell;
pub mod speaker;
pub mod track;
