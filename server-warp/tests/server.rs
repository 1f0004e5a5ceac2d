//! The broker over real HTTP: the server on a random port, the testkit's fake
//! provider behind it.

mod api;
mod bad_input;
mod browser;
mod config;
mod duplicati;
mod duplicati_clients;
mod front_door;
mod interop;
mod processes;
mod support;
