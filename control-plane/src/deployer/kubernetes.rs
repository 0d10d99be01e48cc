//! The `kubernetes` deployer: each cell is a StatefulSet (`deploy/k8s`); deploying a version
//! patches the StatefulSet's cell container to that version's image, with the version in
//! `CELLMAIL_RELEASE` so the cell records it, and waits until the StatefulSet's rollout is
//! done (every replica updated and ready).

use std::time::Duration;

use async_trait::async_trait;
use cellmail_proto::CellId;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};

use super::{DeployError, Deployer};

/// How often the StatefulSet's status is read while its rollout runs.
const POLL: Duration = Duration::from_secs(2);

/// Where the cells' StatefulSets are and what they run, from flags or env.
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesSettings {
    /// The cells' namespace; the client's default (in a pod: its own) when unset.
    #[arg(long = "k8s-namespace", env = "CELLMAIL_K8S_NAMESPACE")]
    pub namespace: Option<String>,
    /// A cell's StatefulSet, `{cell}` standing for its id.
    #[arg(
        long = "k8s-statefulset",
        env = "CELLMAIL_K8S_STATEFULSET",
        default_value = "cellmail-cell-{cell}"
    )]
    pub statefulset: String,
    /// The cell's container in the StatefulSet's pods.
    #[arg(
        long = "k8s-container",
        env = "CELLMAIL_K8S_CONTAINER",
        default_value = "cell"
    )]
    pub container: String,
    /// The image of a version, `{version}` standing for it.
    #[arg(
        long = "k8s-image",
        env = "CELLMAIL_K8S_IMAGE",
        default_value = "cellmail/cellmail:{version}"
    )]
    pub image: String,
}

impl KubernetesSettings {
    fn statefulset_of(&self, cell: &CellId) -> String {
        self.statefulset.replace("{cell}", cell.as_str())
    }

    /// The strategic merge patch that makes the cell container run `version`: containers
    /// and their env are merged by name, so nothing else of the pod changes.
    fn patch(&self, version: &str) -> serde_json::Value {
        serde_json::json!({
            "spec": {"template": {
                "metadata": {"annotations": {"cellmail.dev/release": version}},
                "spec": {"containers": [{
                    "name": self.container,
                    "image": self.image.replace("{version}", version),
                    "env": [{"name": "CELLMAIL_RELEASE", "value": version}],
                }]},
            }}
        })
    }
}

/// Whether the StatefulSet's controller has rolled every replica to its current spec and
/// every replica is ready.
pub fn rollout_done(set: &StatefulSet) -> bool {
    let (Some(spec), Some(status)) = (&set.spec, &set.status) else {
        return false;
    };
    let replicas = spec.replicas.unwrap_or(1);
    status.observed_generation >= set.metadata.generation
        && status.updated_replicas.unwrap_or(0) == replicas
        && status.ready_replicas.unwrap_or(0) == replicas
        && status.current_revision.is_some()
        && status.current_revision == status.update_revision
}

pub struct KubernetesDeployer {
    sets: Api<StatefulSet>,
    settings: KubernetesSettings,
    timeout: Duration,
}

impl KubernetesDeployer {
    /// Connects with the in-cluster service account, or the local kubeconfig.
    pub async fn connect(settings: KubernetesSettings, timeout: Duration) -> anyhow::Result<Self> {
        let client = kube::Client::try_default().await?;
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        Ok(Self {
            sets: Api::namespaced(client, &namespace),
            settings,
            timeout,
        })
    }
}

#[async_trait]
impl Deployer for KubernetesDeployer {
    async fn deploy(&self, cell: &CellId, version: &str) -> Result<(), DeployError> {
        let failed = |reason: String| DeployError {
            cell: cell.clone(),
            version: version.to_owned(),
            reason,
        };
        let name = self.settings.statefulset_of(cell);
        let patch = self.settings.patch(version);
        self.sets
            .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(|e| failed(format!("patching StatefulSet {name}: {e}")))?;
        let rolled = async {
            loop {
                match self.sets.get(&name).await {
                    Ok(set) if rollout_done(&set) => return,
                    Ok(_) => {}
                    Err(err) => tracing::warn!(%err, statefulset = name, "reading the rollout"),
                }
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::time::timeout(self.timeout, rolled)
            .await
            .map_err(|_| {
                failed(format!(
                    "StatefulSet {name} did not roll out within {:?}",
                    self.timeout
                ))
            })?;
        tracing::info!(%cell, version, statefulset = name, "StatefulSet rolled out");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KubernetesSettings {
        KubernetesSettings {
            namespace: None,
            statefulset: "cellmail-cell-{cell}".into(),
            container: "cell".into(),
            image: "registry.example/cellmail-cell:{version}".into(),
        }
    }

    #[test]
    fn the_patch_changes_the_cell_containers_image_and_release_only() {
        let settings = settings();
        assert_eq!(
            settings.statefulset_of(&CellId::new("cell-7").unwrap()),
            "cellmail-cell-cell-7"
        );
        let patch = settings.patch("1.4.2");
        let container = &patch["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["name"], "cell");
        assert_eq!(container["image"], "registry.example/cellmail-cell:1.4.2");
        assert_eq!(container["env"][0]["name"], "CELLMAIL_RELEASE");
        assert_eq!(container["env"][0]["value"], "1.4.2");
        assert_eq!(
            patch["spec"]["template"]["metadata"]["annotations"]["cellmail.dev/release"],
            "1.4.2"
        );
        assert_eq!(patch["spec"].as_object().unwrap().len(), 1);
    }

    fn set(
        generation: i64,
        observed: i64,
        updated: i32,
        ready: i32,
        revisions: (&str, &str),
    ) -> StatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cellmail-cell-cell-1", "generation": generation},
            "spec": {"replicas": 1, "serviceName": "cellmail-cell-cell-1",
                     "selector": {}, "template": {}},
            "status": {"replicas": 1, "observedGeneration": observed,
                       "updatedReplicas": updated, "readyReplicas": ready,
                       "currentRevision": revisions.0, "updateRevision": revisions.1},
        }))
        .unwrap()
    }

    #[test]
    fn a_rollout_is_done_when_the_controller_saw_the_patch_and_every_replica_is_updated_and_ready()
    {
        assert!(rollout_done(&set(2, 2, 1, 1, ("r2", "r2"))));
        assert!(
            !rollout_done(&set(2, 1, 1, 1, ("r2", "r2"))),
            "patch not seen yet"
        );
        assert!(
            !rollout_done(&set(2, 2, 0, 1, ("r1", "r2"))),
            "old pod still running"
        );
        assert!(
            !rollout_done(&set(2, 2, 1, 0, ("r2", "r2"))),
            "new pod not ready"
        );
        assert!(
            !rollout_done(&set(2, 2, 1, 1, ("r1", "r2"))),
            "revision not current"
        );
    }
}
