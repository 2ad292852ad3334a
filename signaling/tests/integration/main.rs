//! Every integration test of the server in one test binary: each linked binary of this stack is
//! hundreds of megabytes, so one binary instead of nine keeps build time and disk use down.

mod chat_support;
mod common;

mod chat;
mod chat_durability;
mod cli;
mod media;
mod robustness;
mod room;
mod simulcast;
mod speaker;
mod whip_whep;
