#![allow(unreachable_pub)] // pub items are shared between the test modules

//! Integration tests: the credgate binary against real peers over real
//! sockets (the IAM emulator process, tonic and grpcurl clients, an OTLP
//! receiver), all on 127.0.0.1.

mod audit_trail;
mod custody;
mod edge;
mod errors;
mod examples;
mod foundation;
mod harness;
mod integrity;
mod otlp;
mod scale;
mod shared_state;
mod state_integrity;
mod telemetry;
mod templates;
mod topologies;
