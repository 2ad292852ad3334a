//! The `warbler` server: HTTP and WebSocket signaling, WHIP/WHEP, access tokens and
//! configuration around the media engine of `warbler-sfu`.

#![forbid(unsafe_code)]

pub mod auth;
pub mod chat;
pub mod config;
pub mod protocol;
pub mod server;
pub mod state;
pub mod web;
pub mod whip;
pub mod ws;
