//! The operator's connection to the control plane's `Control` API: where it is, the admin
//! credential it presents, and `--json`, which every operator command shares.
//!
//! Each command is one call (or a short series of calls) on the [`Client`], printed as a
//! table or, with `--json`, as JSON for scripts.

use cellmail_proto::bearer::Bearer;
use cellmail_proto::v1::control_client::ControlClient;
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Args)]
pub struct Connection {
    /// Address of the control plane (`https://…` for TLS).
    #[arg(
        long,
        env = "CELLMAIL_CONTROL",
        default_value = "127.0.0.1:50052",
        global = true
    )]
    control: String,
    /// The operators' credential (default: the one `cellmail up` keeps in its data dir).
    #[arg(
        long,
        env = "CELLMAIL_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    admin_token: Option<String>,
    /// The data dir of the `cellmail up` whose credential to use, when no token is given.
    #[arg(
        long,
        env = "CELLMAIL_DATA_DIR",
        default_value = ".cellmail",
        global = true
    )]
    data_dir: std::path::PathBuf,
    #[command(flatten)]
    ca: crate::door::PublicCa,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

pub(crate) type Client = ControlClient<InterceptedService<Channel, Bearer>>;

impl Connection {
    pub(crate) async fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.admin_token {
            Some(token) => token.clone(),
            None => {
                let path = self.data_dir.join(crate::up::ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_owned())
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "no admin token: pass --admin-token, set CELLMAIL_ADMIN_TOKEN, or \
                             --data-dir of the `cellmail up` that made {}",
                            path.display()
                        )
                    })?
            }
        };
        let bearer = Bearer::new(&token)?;
        let channel = self.ca.connect(&self.control, "control").await?;
        Ok(ControlClient::with_interceptor(channel, bearer))
    }
}

pub(crate) fn status(err: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", err.code(), err.message())
}
