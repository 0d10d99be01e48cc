//! Which registry a binary opens, and under which prefix: the flags every program shares.

use std::path::Path;
use std::sync::Arc;

use crate::schema;
use crate::{Registry, etcd::EtcdRegistry, local::LocalRegistry};

/// Which registry a binary uses, and under which prefix.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryConfig {
    /// `etcd://host:port[,host:port...]`, or `embedded` (a file under the data dir, one
    /// process only).
    #[arg(long, env = "CELLMAIL_REGISTRY", default_value = "embedded")]
    pub registry: String,
    /// Key prefix of cellmail's records in the registry.
    #[arg(long, env = "CELLMAIL_REGISTRY_PREFIX", default_value = schema::DEFAULT_PREFIX)]
    pub registry_prefix: String,
}

impl RegistryConfig {
    pub async fn open(&self, data_dir: &Path) -> anyhow::Result<Arc<dyn Registry>> {
        match self.registry.as_str() {
            "embedded" => {
                std::fs::create_dir_all(data_dir)?;
                let path = data_dir.join("registry.redb");
                Ok(Arc::new(LocalRegistry::open(&path).await?))
            }
            spec => {
                let Some(endpoints) = spec.strip_prefix("etcd://") else {
                    anyhow::bail!(
                        "--registry {spec:?}: expected `embedded` or `etcd://host:port[,host:port]`"
                    );
                };
                let endpoints: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
                Ok(Arc::new(EtcdRegistry::connect(&endpoints).await?))
            }
        }
    }

    pub fn keys(&self) -> schema::Keys {
        schema::Keys::new(&self.registry_prefix)
    }
}
