//! Generates the cellmail.v1 client and server code and the descriptor set that gRPC
//! server reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("cellmail_v1_descriptor.bin"))
        .compile_protos(
            &[
                "cellmail/v1/sender.proto",
                "cellmail/v1/cell.proto",
                "cellmail/v1/control.proto",
            ],
            &["."],
        )?;
    Ok(())
}
