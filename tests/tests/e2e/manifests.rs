//! deploy/k8s: every manifest parses as the Kubernetes object it says it is, and what the
//! objects say of each other and of the binaries holds: services select pods with the ports
//! they name, containers run our binaries with flags and CELLMAIL_* variables those binaries
//! have, the control plane may patch every cell's StatefulSet and names them as they are,
//! etcd has the three members the registry lists, add-cell.sh renders the cells, every
//! process presents the cert-manager certificate of its own role, and only the platform's
//! pods reach a cell's gRPC port.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use cellmail_proto::tls::Role as TlsRole;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::Value;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Every object of the manifests `kustomization.yaml` lists in `dir`, with its file.
fn objects_in(dir: &Path) -> Vec<(String, Value)> {
    let mut objects = Vec::new();
    for file in resources(dir) {
        let text = std::fs::read_to_string(dir.join(&file)).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
        objects.extend(docs.into_iter().map(|doc| (file.clone(), doc)));
    }
    objects
}

fn objects() -> Vec<(String, Value)> {
    objects_in(&k8s_dir())
}

fn resources(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let kustomization: Value = serde_saphyr::from_str(&text).unwrap();
    kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

fn of_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == kind)
        .collect()
}

fn named<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    of_kind(objects, kind)
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap()
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Parses `object` as the typed Kubernetes object of its kind and apiVersion.
fn typed(object: &Value) -> Result<(), String> {
    fn parse<T: serde::de::DeserializeOwned>(object: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(object.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    }
    let api = (
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default(),
    );
    match api {
        ("v1", "Namespace") => parse::<Namespace>(object),
        ("v1", "ConfigMap") => parse::<ConfigMap>(object),
        ("v1", "Service") => parse::<Service>(object),
        ("v1", "ServiceAccount") => parse::<ServiceAccount>(object),
        ("apps/v1", "Deployment") => parse::<Deployment>(object),
        ("apps/v1", "StatefulSet") => parse::<StatefulSet>(object),
        ("policy/v1", "PodDisruptionBudget") => parse::<PodDisruptionBudget>(object),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => parse::<HorizontalPodAutoscaler>(object),
        ("rbac.authorization.k8s.io/v1", "Role") => parse::<Role>(object),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => parse::<RoleBinding>(object),
        ("networking.k8s.io/v1", "NetworkPolicy") => parse::<NetworkPolicy>(object),
        // cert-manager's kinds have no Rust types: the fields the platform relies on.
        ("cert-manager.io/v1", "Issuer") => {
            let spec = &object["spec"];
            (spec["selfSigned"].is_object() || spec["ca"]["secretName"].is_string())
                .then_some(())
                .ok_or_else(|| "an Issuer is selfSigned or a ca with a secretName".into())
        }
        ("cert-manager.io/v1", "Certificate") => {
            let spec = &object["spec"];
            (spec["secretName"].is_string() && spec["issuerRef"]["name"].is_string())
                .then_some(())
                .ok_or_else(|| "a Certificate names its secretName and issuerRef".into())
        }
        other => Err(format!("unexpected apiVersion/kind {other:?}")),
    }
}

#[test]
fn every_manifest_parses_as_its_kind_and_names_are_unique() {
    let objects = objects();
    let mut seen = BTreeSet::new();
    for (file, object) in &objects {
        typed(object).unwrap_or_else(|e| panic!("{file}: {e}"));
        let key = (object["kind"].to_string(), name(object).to_owned());
        assert!(seen.insert(key.clone()), "{file}: {key:?} twice");
    }
    for kind in [
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(!of_kind(&objects, kind).is_empty(), "no {kind}");
    }
    let listed: BTreeSet<String> = resources(&k8s_dir()).into_iter().collect();
    let mut files = BTreeSet::new();
    for dir in [k8s_dir(), k8s_dir().join("cells")] {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let file = path.strip_prefix(k8s_dir()).unwrap().display().to_string();
            if file.ends_with(".yaml")
                && file != "kustomization.yaml"
                && file != "cell.template.yaml"
            {
                files.insert(file);
            }
        }
    }
    assert_eq!(listed, files, "kustomization.yaml lists every manifest");
}

/// The pod templates of every Deployment and StatefulSet.
fn pod_templates(objects: &[(String, Value)]) -> Vec<(&str, &Value)> {
    objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
        .map(|o| (name(o), &o["spec"]["template"]))
        .collect()
}

fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

#[test]
fn services_budgets_and_autoscalers_reach_pods_with_the_ports_they_name() {
    let objects = objects();
    let templates = pod_templates(&objects);
    for service in of_kind(&objects, "Service") {
        let selector = &service["spec"]["selector"];
        let pods: Vec<_> = templates
            .iter()
            .filter(|(_, t)| selects(selector, &t["metadata"]["labels"]))
            .collect();
        assert_eq!(
            pods.len(),
            1,
            "Service {} selects one workload",
            name(service)
        );
        let ports: Vec<&Value> = items(&pods[0].1["spec"]["containers"])
            .iter()
            .flat_map(|c| items(&c["ports"]))
            .collect();
        for port in items(&service["spec"]["ports"]) {
            let target = &port["targetPort"];
            assert!(
                ports.iter().any(|p| p["name"] == *target),
                "Service {} targets port {target} no container has",
                name(service)
            );
        }
    }
    for budget in of_kind(&objects, "PodDisruptionBudget") {
        let selector = &budget["spec"]["selector"]["matchLabels"];
        assert!(
            templates
                .iter()
                .any(|(_, t)| selects(selector, &t["metadata"]["labels"])),
            "PodDisruptionBudget {} selects no pods",
            name(budget)
        );
    }
    let hpa = named(&objects, "HorizontalPodAutoscaler", "cellmail-router");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    named(&objects, "Deployment", target["name"].as_str().unwrap());
    named(&objects, "PodDisruptionBudget", "cellmail-router");
}

/// `--flag=value` / `--flag value` arguments as (flag, value).
fn flags(args: &[Value]) -> BTreeMap<String, String> {
    let args: Vec<&str> = args.iter().map(|a| a.as_str().unwrap()).collect();
    let mut flags = BTreeMap::new();
    for (i, arg) in args.iter().enumerate() {
        let Some(flag) = arg.strip_prefix("--") else {
            continue;
        };
        let (flag, value) = match flag.split_once('=') {
            Some((f, v)) => (f, v.to_owned()),
            None => match args.get(i + 1).filter(|next| !next.starts_with("--")) {
                Some(next) => (flag, (*next).to_owned()),
                None => (flag, String::new()),
            },
        };
        flags.insert(flag.to_owned(), value);
    }
    flags
}

fn help(binary: &str) -> String {
    let path = cellmail_tests::binary(binary).unwrap();
    let out = Command::new(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "{binary} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// Every variable a container gets: its env and the keys of the ConfigMaps it takes.
fn environment(objects: &[(String, Value)], container: &Value) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = items(&container["env"])
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    for source in items(&container["envFrom"]) {
        let map = named(
            objects,
            "ConfigMap",
            source["configMapRef"]["name"].as_str().unwrap(),
        );
        names.extend(map["data"].as_object().unwrap().keys().cloned());
    }
    names
}

#[test]
fn containers_run_our_binaries_with_flags_variables_and_ports_they_have() {
    let objects = objects();
    let mut checked = BTreeSet::new();
    for (workload, template) in pod_templates(&objects) {
        for container in items(&template["spec"]["containers"]) {
            let binary = container["command"][0].as_str().unwrap();
            if !binary.starts_with("cellmail") {
                continue;
            }
            let help = help(binary);
            let flags = flags(items(&container["args"]));
            for flag in flags.keys() {
                assert!(
                    help.contains(&format!("--{flag} ")) || help.contains(&format!("--{flag}\n")),
                    "{workload}: {binary} has no --{flag}"
                );
            }
            let environment = environment(&objects, container);
            for var in environment.iter().filter(|v| v.starts_with("CELLMAIL_")) {
                // `[env: NAME=default]`, or `[env: NAME]` for a hidden value.
                assert!(
                    help.contains(&format!("[env: {var}="))
                        || help.contains(&format!("[env: {var}]")),
                    "{workload}: {binary} reads no {var}"
                );
            }
            for value in flags.values() {
                for var in value
                    .split("$(")
                    .skip(1)
                    .filter_map(|s| s.split(')').next())
                {
                    assert!(environment.contains(var), "{workload}: $({var}) is not set");
                }
            }
            let ports: BTreeSet<String> = items(&container["ports"])
                .iter()
                .map(|p| p["containerPort"].to_string())
                .collect();
            for (flag, value) in flags
                .iter()
                .filter(|(f, _)| f.ends_with("-addr") && !f.contains("advertise"))
            {
                let port = value.rsplit(':').next().unwrap();
                assert!(
                    ports.contains(port),
                    "{workload}: --{flag} {value} is no containerPort"
                );
            }
            for probe in ["readinessProbe", "livenessProbe"] {
                let probe_port = |kind: &str| container[probe][kind]["port"].as_u64();
                if let Some(port) = probe_port("grpc").or_else(|| probe_port("tcpSocket")) {
                    assert!(
                        ports.contains(&port.to_string()),
                        "{workload}: {probe} port {port}"
                    );
                }
            }
            checked.insert(binary.to_owned());
        }
    }
    let all =
        BTreeSet::from(["cellmail-cell", "cellmail-control", "cellmail-router"].map(str::to_owned));
    assert_eq!(checked, all, "every binary is deployed");
}

#[test]
fn the_control_plane_may_patch_every_cells_statefulset_and_names_it_as_it_is() {
    let objects = objects();
    let control = named(&objects, "Deployment", "cellmail-control");
    assert_eq!(control["spec"]["replicas"], 2, "a leader and a standby");
    let pod = &control["spec"]["template"]["spec"];
    let account = pod["serviceAccountName"].as_str().unwrap();
    named(&objects, "ServiceAccount", account);
    let binding = of_kind(&objects, "RoleBinding")
        .into_iter()
        .find(|b| items(&b["subjects"]).iter().any(|s| s["name"] == account))
        .expect("the control plane's account is bound to a role");
    let role = named(
        &objects,
        "Role",
        binding["roleRef"]["name"].as_str().unwrap(),
    );
    assert!(
        items(&role["rules"]).iter().any(|rule| {
            let has = |field: &str, want: &str| items(&rule[field]).iter().any(|v| v == want);
            has("apiGroups", "apps")
                && has("resources", "statefulsets")
                && has("verbs", "patch")
                && has("verbs", "get")
        }),
        "{role}"
    );
    let flags = flags(items(&pod["containers"][0]["args"]));
    assert_eq!(flags["deployer"], "kubernetes");
    assert!(flags["k8s-image"].contains("{version}"));

    let cells: Vec<&Value> = of_kind(&objects, "StatefulSet")
        .into_iter()
        .filter(|s| name(s).starts_with("cellmail-cell-"))
        .collect();
    assert!(cells.len() >= 2, "at least two cells");
    for cell in cells {
        let container = &items(&cell["spec"]["template"]["spec"]["containers"])[0];
        let id = items(&container["env"])
            .iter()
            .find(|e| e["name"] == "CELLMAIL_CELL_ID")
            .and_then(|e| e["value"].as_str())
            .expect("a cell's id is in its env");
        assert_eq!(flags["k8s-statefulset"].replace("{cell}", id), name(cell));
        assert_eq!(container["name"], flags["k8s-container"].as_str());
        assert_eq!(cell["spec"]["replicas"], 1, "a cell is one process");
        let data_dir = self::flags(items(&container["args"]))["data-dir"].clone();
        let mount = items(&container["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == data_dir.as_str())
            .expect("the data dir is a volume");
        let claims = items(&cell["spec"]["volumeClaimTemplates"]);
        assert!(
            claims
                .iter()
                .any(|c| c["metadata"]["name"] == mount["name"])
        );
    }
}

#[test]
fn etcd_has_the_three_members_the_registry_names() {
    let objects = objects();
    let etcd = named(&objects, "StatefulSet", "cellmail-etcd");
    assert_eq!(etcd["spec"]["replicas"], 3);
    let service = etcd["spec"]["serviceName"].as_str().unwrap();
    let registry = named(&objects, "ConfigMap", "cellmail-registry")["data"]["CELLMAIL_REGISTRY"]
        .as_str()
        .unwrap();
    let members: Vec<String> = (0..3)
        .map(|n| format!("{}-{n}.{service}:2379", name(etcd)))
        .collect();
    assert_eq!(registry, format!("etcd://{}", members.join(",")));
}

#[test]
fn add_cell_renders_the_cells_from_the_template() {
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .args(["-r", &format!("{}/.", k8s_dir().display())])
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let cells = copy.path().join("cells");
    let checked_in = std::fs::read_to_string(cells.join("cell-1.yaml")).unwrap();
    std::fs::remove_file(cells.join("cell-1.yaml")).unwrap();
    let add = |id: &str| {
        Command::new(copy.path().join("add-cell.sh"))
            .arg(id)
            .output()
            .unwrap()
    };
    assert!(add("cell-1").status.success());
    assert_eq!(
        std::fs::read_to_string(cells.join("cell-1.yaml")).unwrap(),
        checked_in,
        "cells/cell-1.yaml is what add-cell.sh renders"
    );
    assert!(add("cell-9").status.success());
    assert!(
        !add("cell-9").status.success(),
        "an existing cell is refused"
    );
    assert!(!add("Bad_Id").status.success(), "a bad id is refused");
    let objects = objects_in(copy.path());
    let set = named(&objects, "StatefulSet", "cellmail-cell-cell-9");
    typed(set).unwrap();
    named(&objects, "Service", "cellmail-cell-cell-9");
}

/// The Secret a volume of pod `template` mounted at `dir` in `container` holds.
fn mounted_secret<'a>(template: &'a Value, container: &Value, dir: &str) -> Option<&'a str> {
    let mount = items(&container["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir)?;
    let volume = items(&template["spec"]["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    volume["secret"]["secretName"].as_str()
}

#[test]
fn the_control_plane_and_every_cell_read_the_dkim_key_encryption_keys_from_one_secret() {
    let objects = objects();
    let mut readers = BTreeSet::new();
    for (workload, template) in pod_templates(&objects) {
        for container in items(&template["spec"]["containers"]) {
            let binary = container["command"][0].as_str().unwrap();
            if !["cellmail-control", "cellmail-cell"].contains(&binary) {
                continue;
            }
            let file = env_value(container, "CELLMAIL_DKIM_KEY_FILE")
                .unwrap_or_else(|| panic!("{workload}: no CELLMAIL_DKIM_KEY_FILE"));
            let (dir, key) = file.rsplit_once('/').unwrap();
            assert_eq!(key, "keys", "{workload}: the Secret's key");
            assert_eq!(
                mounted_secret(template, container, dir),
                Some("cellmail-dkim"),
                "{workload}"
            );
            readers.insert(binary);
        }
    }
    assert_eq!(
        readers,
        BTreeSet::from(["cellmail-cell", "cellmail-control"])
    );
}

/// The value of `container`'s env variable `name`.
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    items(&container["env"])
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

#[test]
fn every_process_presents_the_certificate_of_its_own_role_from_the_platform_ca() {
    let objects = objects();
    let issuers: BTreeSet<&str> = of_kind(&objects, "Issuer").into_iter().map(name).collect();
    let ca = named(&objects, "Certificate", "cellmail-ca");
    assert_eq!(ca["spec"]["isCA"], true);
    let ca_issuer = named(&objects, "Issuer", "cellmail-ca");
    assert_eq!(
        ca_issuer["spec"]["ca"]["secretName"],
        ca["spec"]["secretName"]
    );
    let mut roles = BTreeSet::new();
    for (workload, template) in pod_templates(&objects) {
        for container in items(&template["spec"]["containers"]) {
            let binary = container["command"][0].as_str().unwrap();
            if !binary.starts_with("cellmail") {
                continue;
            }
            // The three files come from one mounted Secret, as cert-manager writes it.
            let cert = env_value(container, "CELLMAIL_TLS_CERT").unwrap();
            let dir = cert.rsplit_once('/').unwrap().0;
            assert_eq!(
                env_value(container, "CELLMAIL_TLS_KEY"),
                Some(&*format!("{dir}/tls.key"))
            );
            assert_eq!(
                env_value(container, "CELLMAIL_TLS_CA"),
                Some(&*format!("{dir}/ca.crt"))
            );
            assert_eq!(cert, format!("{dir}/tls.crt"), "{workload}");
            let secret = mounted_secret(template, container, dir)
                .unwrap_or_else(|| panic!("{workload}: no Secret mounted at {dir}"));
            let certificate = of_kind(&objects, "Certificate")
                .into_iter()
                .find(|c| c["spec"]["secretName"] == secret)
                .unwrap_or_else(|| panic!("{workload}: no Certificate writes {secret}"));
            let issuer = certificate["spec"]["issuerRef"]["name"].as_str().unwrap();
            assert_eq!(issuer, "cellmail-ca", "{workload}");
            assert!(issuers.contains(issuer));
            let usages: BTreeSet<&str> = items(&certificate["spec"]["usages"])
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(usages, BTreeSet::from(["server auth", "client auth"]));
            let uris = items(&certificate["spec"]["uris"]);
            assert_eq!(uris.len(), 1, "{workload}: one role");
            let role = TlsRole::from_uri(uris[0].as_str().unwrap()).unwrap();
            let expected = match binary {
                "cellmail-router" => TlsRole::Router,
                "cellmail-control" => TlsRole::Control,
                "cellmail-cell" => {
                    let id = env_value(container, "CELLMAIL_CELL_ID").unwrap();
                    TlsRole::Cell(cellmail_proto::CellId::new(id).unwrap())
                }
                other => panic!("{workload}: {other}"),
            };
            assert_eq!(role, expected, "{workload}");
            roles.insert(role.to_string());
        }
    }
    assert!(
        roles.len() >= 4,
        "router, control and at least two cells: {roles:?}"
    );
}

#[test]
fn only_the_platforms_pods_reach_a_cells_grpc_port() {
    let objects = objects();
    let policy = named(&objects, "NetworkPolicy", "cellmail-cells");
    let cells = &policy["spec"]["podSelector"]["matchLabels"];
    for cell in of_kind(&objects, "StatefulSet")
        .into_iter()
        .filter(|s| name(s).starts_with("cellmail-cell-"))
    {
        let labels = &cell["spec"]["template"]["metadata"]["labels"];
        assert!(selects(cells, labels), "{} is not covered", name(cell));
    }
    let rules = items(&policy["spec"]["ingress"]);
    let grpc: Vec<&Value> = rules
        .iter()
        .filter(|rule| items(&rule["ports"]).iter().any(|p| p["port"] == "grpc"))
        .collect();
    assert_eq!(grpc.len(), 1, "one rule opens the gRPC port");
    let from: BTreeSet<&str> = items(&grpc[0]["from"])
        .iter()
        .map(|peer| {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        from,
        BTreeSet::from(["cellmail-router", "cellmail-control", "cellmail-cell"])
    );
    for rule in rules.iter().filter(|rule| !grpc.contains(rule)) {
        let ports: Vec<&Value> = items(&rule["ports"]).iter().collect();
        assert!(
            !ports.is_empty() && ports.iter().all(|p| p["port"] == "metrics"),
            "any other rule opens only the metrics port: {rule}"
        );
    }
}

#[test]
fn the_front_doors_serve_their_clients_over_tls_for_their_service_names() {
    let objects = objects();
    for door in ["cellmail-router", "cellmail-control"] {
        let deployment = named(&objects, "Deployment", door);
        let template = &deployment["spec"]["template"];
        let container = &items(&template["spec"]["containers"])[0];
        let flags = flags(items(&container["args"]));
        assert!(!flags.contains_key("insecure-plaintext"), "{door}");
        let cert = env_value(container, "CELLMAIL_PUBLIC_TLS_CERT").unwrap();
        let dir = cert.rsplit_once('/').unwrap().0;
        assert_eq!(cert, format!("{dir}/tls.crt"));
        assert_eq!(
            env_value(container, "CELLMAIL_PUBLIC_TLS_KEY"),
            Some(&*format!("{dir}/tls.key"))
        );
        let mount = items(&container["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap();
        let volume = items(&template["spec"]["volumes"])
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let secret = &volume["secret"]["secretName"];
        let certificate = of_kind(&objects, "Certificate")
            .into_iter()
            .find(|c| c["spec"]["secretName"] == *secret)
            .unwrap_or_else(|| panic!("{door}: no Certificate writes {secret}"));
        let names: Vec<&str> = items(&certificate["spec"]["dnsNames"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let service = named(&objects, "Service", door);
        assert!(names.contains(&name(service)), "{door}: {names:?}");
        assert!(
            items(&certificate["spec"]["usages"])
                .iter()
                .any(|u| u == "server auth")
        );
    }
}

#[test]
fn the_image_holds_every_binary_the_manifests_run_as_a_non_root_user() {
    let dockerfile = std::fs::read_to_string(k8s_dir().join("../Dockerfile")).unwrap();
    // The image's own stage: what follows the last FROM, its lines joined where continued.
    let last = dockerfile
        .rsplit("\nFROM ")
        .next()
        .unwrap()
        .replace("\\\n", " ");
    let user = last
        .lines()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the image names its user");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    let copied: BTreeSet<&str> = last
        .lines()
        .filter(|line| line.starts_with("COPY ") && line.trim_end().ends_with("/usr/local/bin/"))
        .flat_map(str::split_whitespace)
        .filter_map(|word| word.rsplit_once("/release/").map(|(_, binary)| binary))
        .collect();
    let objects = objects();
    for (workload, template) in pod_templates(&objects) {
        for container in items(&template["spec"]["containers"]) {
            let image = container["image"].as_str().unwrap();
            if !image.starts_with("cellmail/cellmail:") {
                continue;
            }
            let binary = container["command"][0].as_str().unwrap();
            assert!(
                copied.contains(binary),
                "{workload}: {binary} is not in the image"
            );
        }
    }
    assert!(
        copied.contains("cellmail"),
        "the CLI, for operators in the pods"
    );
}
