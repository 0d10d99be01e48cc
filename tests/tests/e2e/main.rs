//! The end-to-end suites, one test binary: each boots the real binaries against real services.
mod breakers;
mod catalog;
mod cli;
mod identities;
mod isolation;
mod manifests;
mod metrics;
mod moves;
mod offboard;
mod processes;
mod queue;
mod registry;
mod rollout;
mod send_path;
mod ses;
mod telemetry;
mod trust;
