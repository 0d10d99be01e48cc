//! Generates the cellmail.v1 client and server code and the descriptor set that gRPC
//! server reflection serves, and stamps the build id every binary reports: `CELLMAIL_BUILD_ID`
//! when the build sets it (a packaged build), else the commit it was built from.
use std::path::{Path, PathBuf};
use std::process::Command;

fn build_id() -> String {
    println!("cargo:rerun-if-env-changed=CELLMAIL_BUILD_ID");
    if let Ok(id) = std::env::var("CELLMAIL_BUILD_ID") {
        return id;
    }
    // Rebuilt when the checkout moves to another commit: HEAD, or the branch it names (a
    // loose ref under refs/, or packed). Only paths that exist are watched: a missing one
    // would make every build rebuild.
    let git = Path::new("../.git");
    for watched in [git.join("HEAD"), git.join("refs"), git.join("packed-refs")] {
        if watched.exists() {
            println!("cargo:rerun-if-changed={}", watched.display());
        }
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rustc-env=CELLMAIL_BUILD_ID={}", build_id());
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "cellmail/v1/sender.proto",
        "cellmail/v1/cell.proto",
        "cellmail/v1/control.proto",
    ];
    // Watching the git paths above replaces cargo's default of rerunning on any change in
    // the package, so the protos are watched by name.
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("cellmail_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
