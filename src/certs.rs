//! `cellmail certs`: certificates for the platform's processes from a CA of its own, for a
//! platform run without cert-manager (`deploy/local/cluster.sh`; `cellmail up` does the same
//! in-process). `issue` makes the CA in `--dir` if there is none, then a certificate for one
//! role, and prints the settings that give it to a process, as a `--config` file takes them.

use std::path::PathBuf;
use std::time::Duration;

use cellmail_proto::CellId;
use cellmail_proto::tls::{Role, ca::LocalCa};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Issue a certificate for a router, a control plane or a cell.
    Issue {
        /// The CA's directory (its certificate and key are made there on first use); the
        /// certificate and its key are written there too.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        role: RoleName,
        /// The cell's id, for `--role cell`.
        #[arg(long = "cell-id", required_if_eq("role", "cell"))]
        cell_id: Option<CellId>,
        /// A DNS name or IP address the certificate also names (repeatable), so that it can
        /// serve the router's or control plane's own port there (`--public-tls-cert`).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleName {
    Router,
    Control,
    Cell,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Issue {
            dir,
            role,
            cell_id,
            names,
            days,
        } => {
            let role = match (role, cell_id) {
                (RoleName::Router, None) => Role::Router,
                (RoleName::Control, None) => Role::Control,
                (RoleName::Cell, Some(id)) => Role::Cell(id),
                (_, Some(_)) => anyhow::bail!("--cell-id is only for --role cell"),
                (RoleName::Cell, None) => anyhow::bail!("--role cell needs --cell-id"),
            };
            let validity = Duration::from_secs(days * 24 * 3600);
            let files = LocalCa::open_or_create(&dir)?.issue_named(&role, &names, validity)?;
            println!("CELLMAIL_TLS_CERT={}", files.cert.display());
            println!("CELLMAIL_TLS_KEY={}", files.key.display());
            println!("CELLMAIL_TLS_CA={}", files.ca.display());
            Ok(())
        }
    }
}
