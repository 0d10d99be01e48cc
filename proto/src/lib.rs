//! cellmail's shared contract.
//!
//! - [`v1`]: the generated `cellmail.v1` messages, clients and servers (Sender, Cell, Control)
//!   and the encoded descriptor set served by gRPC reflection.
//! - [`domain`]: the identifiers and small value types every crate shares (`TenantId`,
//!   `CellId`, `MessageId`, `Epoch`, `MessageClass`), validated when constructed.
//! - [`error`]: the one mapping from domain failures to gRPC status codes with
//!   machine-readable details, and back (the router reads a cell's answers with it).
//! - [`server`]: log setup and the gRPC server every binary runs (with health and reflection).
//! - [`trace`]: W3C trace context across calls and queues, so one send is one trace.
//! - [`bearer`]: the client interceptor that presents a credential.
//! - [`clock`]: the time every record is stamped with, and the units figures count by.
//! - [`config`]: configuration files of `CELLMAIL_*` settings.
//! - [`tls`]: mutual TLS between the platform's processes, and the roles their certificates
//!   name.
//! - [`size`]: how large a message may be, and the answer to one that is larger.

pub mod bearer;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod server;
pub mod size;
pub mod tls;
pub mod trace;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("cellmail.v1");

    /// Encoded `FileDescriptorSet` of every cellmail.v1 file, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cellmail_v1_descriptor");
}

pub use domain::{
    CellId, Epoch, IdError, MessageClass, MessageId, SuppressionReason, SuppressionScope, TenantId,
    suppression_key,
};

pub use clock::now_ms;
pub use error::ApiError;

/// What every binary reports as its version: the release and the build it came from
/// (`<version>+<build id>`), as `--version` prints and a cell records in the registry.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("CELLMAIL_BUILD_ID"));
