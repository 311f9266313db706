//! The deployment files agree with the server: the Kubernetes base (deploy/base) probes the paths
//! and port the server answers on, scales on a metric the server exports, and gives the server's
//! graceful drain the time it takes; the image (Dockerfile) exposes and health-checks the same port
//! and path, runs as the pods' user and reads its settings where the ConfigMap is mounted.
//! Schemas and the rendering of the overlays are checked by `.ci/deploy-check`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use huginn::settings::{DEFAULT_FILE, DEFAULT_MODEL, Settings};
use serde_json::{Value, json};

/// The container of deploy/base/deployment.yaml that runs the server.
const CONTAINER: &str = "huginn";
/// Dockerfile stages that are images: the base Deployment runs `cpu`, the gpu overlay `cuda`.
const IMAGE_STAGES: [&str; 2] = ["cpu", "cuda"];

// ---------------------------------------------------------------------------------------------
// Reading the files.

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// A YAML document as a JSON value, to navigate with JSON pointers.
fn yaml(path: &str) -> Value {
    serde_norway::from_str(&repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value.pointer(pointer).unwrap_or_else(|| panic!("nothing at {pointer} in {value}"))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer).as_str().unwrap_or_else(|| panic!("{pointer} is not a string"))
}

fn u64_at(value: &Value, pointer: &str) -> u64 {
    at(value, pointer).as_u64().unwrap_or_else(|| panic!("{pointer} is not a non-negative integer"))
}

fn array_at<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    at(value, pointer).as_array().unwrap_or_else(|| panic!("{pointer} is not a list"))
}

/// The element of `list` whose `field` is `value`.
fn find<'a>(list: &'a [Value], field: &str, value: &str) -> &'a Value {
    list.iter().find(|item| item[field] == value).unwrap_or_else(|| panic!("no entry with {field} = {value}"))
}

/// The manifests of deploy/base that the checks read.
struct Base {
    deployment: Value,
    hpa: Value,
    service_monitor: Value,
    /// Name of the ConfigMap made from the settings file, and the file's key in it.
    config_map: String,
    config_key: String,
    /// The settings file (huginn.toml) the ConfigMap holds.
    settings_toml: String,
}

fn base() -> Base {
    let kustomization = yaml("deploy/base/kustomization.yaml");
    let resources: Vec<&str> = array_at(&kustomization, "/resources").iter().filter_map(Value::as_str).collect();
    for file in ["deployment.yaml", "hpa.yaml", "servicemonitor.yaml"] {
        assert!(resources.contains(&file), "deploy/base/kustomization.yaml does not deploy {file}");
    }
    let generator = &array_at(&kustomization, "/configMapGenerator")[0];
    let entry = str_at(generator, "/files/0");
    // `files` entries are `PATH` (key: the file name) or `KEY=PATH`.
    let (key, file) = entry.split_once('=').unwrap_or((entry.rsplit('/').next().unwrap(), entry));
    Base {
        deployment: yaml("deploy/base/deployment.yaml"),
        hpa: yaml("deploy/base/hpa.yaml"),
        service_monitor: yaml("deploy/base/servicemonitor.yaml"),
        config_map: str_at(generator, "/name").to_string(),
        config_key: key.to_string(),
        settings_toml: repo_file(&format!("deploy/base/{file}")),
    }
}

impl Base {
    fn container(&self) -> &Value {
        find(array_at(&self.deployment, "/spec/template/spec/containers"), "name", CONTAINER)
    }

    /// The container's literal environment (`valueFrom` entries are not known here).
    fn container_env(&self) -> Vec<(String, String)> {
        let env = self.container().get("env").and_then(Value::as_array).cloned().unwrap_or_default();
        env.iter()
            .filter_map(|e| Some((e["name"].as_str()?.to_string(), e.get("value")?.as_str()?.to_string())))
            .collect()
    }

    /// `containerPort` of the container's port called `name`.
    fn named_port(&self, name: &str) -> u16 {
        let port = u64_at(find(array_at(self.container(), "/ports"), "name", name), "/containerPort");
        u16::try_from(port).unwrap()
    }

    /// Path and port of an `httpGet` probe (`startupProbe`, `readinessProbe`, `livenessProbe`).
    fn probe(&self, probe: &str) -> (String, u16) {
        let get = at(self.container(), &format!("/{probe}/httpGet"));
        let port = match &get["port"] {
            Value::String(name) => self.named_port(name),
            Value::Number(number) => u16::try_from(number.as_u64().unwrap()).unwrap(),
            other => panic!("{probe}: port {other}"),
        };
        (str_at(get, "/path").to_string(), port)
    }

    /// Where `key` of the pod volume fed by the `kind` (`configMap` or `secret`) called `source`
    /// appears in the container.
    fn mounted_file(&self, kind: &str, source: &str, key: &str) -> PathBuf {
        let name_field = if kind == "secret" { "secretName" } else { "name" };
        let volumes = array_at(&self.deployment, "/spec/template/spec/volumes");
        let volume = volumes
            .iter()
            .find(|v| v[kind][name_field] == source)
            .unwrap_or_else(|| panic!("no volume from the {kind} {source}"));
        let in_volume = match volume[kind].get("items").and_then(Value::as_array) {
            Some(items) => str_at(find(items, "key", key), "/path").to_string(),
            None => key.to_string(),
        };
        let mount = find(array_at(self.container(), "/volumeMounts"), "name", str_at(volume, "/name"));
        let mount_path = Path::new(str_at(mount, "/mountPath"));
        match mount.get("subPath").and_then(Value::as_str) {
            Some(sub_path) => {
                assert_eq!(sub_path, in_volume, "the subPath mounts another file of the {kind}");
                mount_path.to_path_buf()
            }
            None => mount_path.join(in_volume),
        }
    }

    /// Seconds slept by the container's preStop hook (`exec: sleep N` or `sleep: {seconds: N}`).
    fn pre_stop_sleep_seconds(&self) -> u64 {
        let pre_stop = at(self.container(), "/lifecycle/preStop");
        if let Some(seconds) = pre_stop.pointer("/sleep/seconds") {
            return seconds.as_u64().unwrap();
        }
        let command: Vec<&str> = array_at(pre_stop, "/exec/command").iter().filter_map(Value::as_str).collect();
        let words: Vec<&str> = command.iter().flat_map(|part| part.split_whitespace()).collect();
        match words.as_slice() {
            [.., "sleep", seconds] => seconds.parse().unwrap_or_else(|_| panic!("preStop: sleep {seconds}")),
            _ => panic!("the preStop hook is not a plain sleep: {command:?}"),
        }
    }
}

/// One stage of the Dockerfile: its `AS` name and its instructions (keyword, arguments).
struct Stage {
    name: String,
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages() -> Vec<Stage> {
    // Logical instructions: continuation lines joined, comments and blank lines dropped.
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in repo_file("Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => logical.push(std::mem::take(&mut current) + line),
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in logical {
        let (keyword, args) = instruction.split_once(char::is_whitespace).unwrap_or((instruction.as_str(), ""));
        let (keyword, args) = (keyword.to_ascii_uppercase(), args.trim().to_string());
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => String::new(),
            };
            stages.push(Stage { name, instructions: Vec::new() });
        } else {
            stages.last_mut().expect("an instruction before FROM").instructions.push((keyword, args));
        }
    }
    stages
}

fn image_stage(name: &str) -> Stage {
    dockerfile_stages().into_iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no stage `{name}`"))
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions.iter().filter(|(k, _)| k == keyword).map(|(_, a)| a.as_str()).collect()
    }

    /// Arguments of the stage's last `keyword` instruction (the one in effect).
    fn last(&self, keyword: &str) -> &str {
        self.all(keyword).pop().unwrap_or_else(|| panic!("stage {}: no {keyword}", self.name))
    }

    /// `ENV KEY=VALUE ...` pairs, in order.
    fn env(&self) -> Vec<(String, String)> {
        self.all("ENV")
            .into_iter()
            .flat_map(str::split_whitespace)
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}: use KEY=VALUE"));
                (key.to_string(), value.to_string())
            })
            .collect()
    }

    fn env_value(&self, key: &str) -> Option<String> {
        self.env().into_iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn exposed_port(&self) -> u16 {
        let expose = self.last("EXPOSE");
        expose.split('/').next().unwrap().parse().unwrap_or_else(|_| panic!("EXPOSE {expose}"))
    }

    /// The request path and port of the HEALTHCHECK (`/dev/tcp/127.0.0.1/PORT` then `GET PATH`);
    /// a `${VAR}` port is the stage's ENV value.
    fn healthcheck_target(&self) -> (String, u16) {
        let check = self.last("HEALTHCHECK");
        let after = |marker: &str| -> String {
            let rest = &check[check.find(marker).unwrap_or_else(|| panic!("HEALTHCHECK has no {marker}"))..];
            rest[marker.len()..].split(|c: char| c.is_whitespace() || c == '&').next().unwrap().to_string()
        };
        let port_text = after("/dev/tcp/127.0.0.1/");
        let port = match port_text.strip_prefix("${").and_then(|p| p.strip_suffix('}')) {
            Some(var) => self.env_value(var).unwrap_or_else(|| panic!("HEALTHCHECK uses ${{{var}}}, not set by ENV")),
            None => port_text.clone(),
        };
        (after("GET "), port.parse().unwrap())
    }

    /// `USER uid:gid`, numeric.
    fn user(&self) -> (u64, u64) {
        let user = self.last("USER");
        let (uid, gid) = user.split_once(':').unwrap_or_else(|| panic!("USER {user}: give uid:gid"));
        (uid.parse().unwrap(), gid.parse().unwrap())
    }

    /// Destinations of the stage's COPY instructions.
    fn copied_to(&self) -> Vec<&str> {
        self.all("COPY").into_iter().map(|args| args.split_whitespace().next_back().unwrap()).collect()
    }
}

/// The settings `huginn serve` runs with in a pod of the base: the ConfigMap's file, then the
/// image's ENV, then the container's env (later ones win, as in Kubernetes).
fn pod_settings(base: &Base, image: &Stage) -> Settings {
    let env = image.env().into_iter().chain(base.container_env());
    Settings::from_sources(&base.settings_toml, Path::new("deploy/base/huginn.toml"), env)
        .unwrap_or_else(|e| panic!("the ConfigMap's settings in a pod: {e}"))
}

fn has_series(metrics_page: &str, name: &str) -> bool {
    metrics_page.lines().any(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
}

// ---------------------------------------------------------------------------------------------
// The checks.

#[test]
fn the_configmap_settings_are_the_ones_in_effect() {
    let base = base();
    let file = Settings::from_sources(&base.settings_toml, Path::new("configmap"), Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("the ConfigMap's huginn.toml: {e}"));
    assert_eq!(file.server.host, "0.0.0.0", "the pods must listen on all interfaces");
    let image = image_stage(IMAGE_STAGES[0]);
    let effective = pod_settings(&base, &image);
    // The image's and the Deployment's environment must not silently override the file's address.
    assert_eq!((&effective.server.host, effective.server.port), (&file.server.host, file.server.port));

    // The file is mounted where the server reads its settings: WORKDIR/config/default.toml.
    let settings_path = Path::new(image.last("WORKDIR")).join(DEFAULT_FILE);
    assert_eq!(base.mounted_file("configMap", &base.config_map, &base.config_key), settings_path);
    // The API keys file is the mounted Secret (whose key is the file's name).
    let keys_file = effective.server.api_keys_file.clone().expect("the pods read API keys from a file");
    let volumes = array_at(&base.deployment, "/spec/template/spec/volumes");
    let secret = volumes.iter().find_map(|v| v["secret"]["secretName"].as_str()).expect("a Secret volume");
    let secret_key = keys_file.file_name().unwrap().to_str().unwrap();
    assert_eq!(base.mounted_file("secret", secret, secret_key), keys_file);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_probes_and_the_scrape_reach_a_server_started_with_the_configmap_settings() {
    let base = base();
    let settings = pod_settings(&base, &image_stage(IMAGE_STAGES[0]));
    let http_port = base.named_port("http");
    assert_eq!(http_port, settings.server.port, "the container port `http` is not the port the server listens on");

    let (ready_path, ready_port) = base.probe("readinessProbe");
    let (startup_path, startup_port) = base.probe("startupProbe");
    let (live_path, live_port) = base.probe("livenessProbe");
    assert_eq!([ready_port, startup_port, live_port], [http_port; 3], "every probe targets the port `http`");
    // Readiness (and startup) must fail while loading, restarting a worker and draining: /ready.
    // Liveness must not: /health, which answers while the process runs.
    assert_eq!((ready_path.as_str(), startup_path.as_str()), ("/ready", "/ready"));
    assert_eq!(live_path, "/health");
    let metrics_path = str_at(&base.service_monitor, "/spec/endpoints/0/path").to_string();
    // Probes and Prometheus send no API key.
    for path in [&ready_path, &live_path, &metrics_path] {
        assert!(settings.server.auth_open_paths.contains(path), "{path} is not in server.auth_open_paths");
    }

    // The same settings, on loopback, with a key file standing in for the Secret.
    let mut keys = tempfile::NamedTempFile::new().unwrap();
    writeln!(keys, "# deploy test\ndeploy-test-key").unwrap();
    let mut local = settings.clone();
    local.server.host = "127.0.0.1".into();
    local.server.api_keys_file = Some(keys.path().to_path_buf());
    let server = common::server::start_with(local).await;
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{}{path}", server.base)).send();

    // The startup probe's budget, capped for a test.
    let startup_budget = Duration::from_secs(
        (u64_at(base.container(), "/startupProbe/periodSeconds")
            * u64_at(base.container(), "/startupProbe/failureThreshold"))
        .min(30),
    );
    let started = Instant::now();
    while get(&startup_path).await.unwrap().status() != 200 {
        assert!(started.elapsed() < startup_budget, "{startup_path} did not answer 200 within {startup_budget:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&ready_path).await.unwrap().status(), 200, "readiness {ready_path}");
    assert_eq!(get(&live_path).await.unwrap().status(), 200, "liveness {live_path}");

    // The autoscaler's gauge is on the scrape (with the key file in effect for the API).
    let completions = format!("{}/v1/completions", server.base);
    let body = json!({"prompt": "hello", "max_tokens": 2});
    let refused = client.post(completions.as_str()).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 401, "the key file is in effect");
    let answered = client.post(completions.as_str()).bearer_auth("deploy-test-key").json(&body).send().await.unwrap();
    assert_eq!(answered.status(), 200);
    let metrics = get(&metrics_path).await.unwrap();
    assert_eq!(metrics.status(), 200, "scrape of {metrics_path}");
    let page = metrics.text().await.unwrap();
    let hpa_metric = str_at(&base.hpa, "/spec/metrics/0/pods/metric/name");
    assert!(has_series(&page, hpa_metric), "the HPA's metric {hpa_metric} is not on {metrics_path}:\n{page}");
    drop(keys);
}

#[test]
fn the_autoscaler_scales_the_deployment_on_the_waiting_requests_gauge() {
    let base = base();
    let target = at(&base.hpa, "/spec/scaleTargetRef");
    assert_eq!(str_at(target, "/apiVersion"), str_at(&base.deployment, "/apiVersion"));
    assert_eq!(str_at(target, "/kind"), "Deployment");
    assert_eq!(str_at(target, "/name"), str_at(&base.deployment, "/metadata/name"));

    let metrics = array_at(&base.hpa, "/spec/metrics");
    let pods = find(metrics, "type", "Pods");
    assert_eq!(str_at(pods, "/pods/metric/name"), huginn::metrics::REQUESTS_WAITING);
    assert_eq!(str_at(pods, "/pods/target/type"), "AverageValue", "a per-pod average of the gauge");
    // The fallback: CPU utilisation, which is relative to the container's CPU request.
    let cpu = find(metrics, "type", "Resource");
    assert_eq!(str_at(cpu, "/resource/name"), "cpu");
    assert_eq!(str_at(cpu, "/resource/target/type"), "Utilization");
    assert!(base.container().pointer("/resources/requests/cpu").is_some(), "utilisation needs a CPU request");
}

#[test]
fn the_termination_grace_period_covers_the_pre_stop_sleep_and_the_drain() {
    let base = base();
    let settings = pod_settings(&base, &image_stage(IMAGE_STAGES[0]));
    let pre_stop = base.pre_stop_sleep_seconds();
    let drain = settings.server.shutdown_grace_seconds;
    let grace = u64_at(&base.deployment, "/spec/template/spec/terminationGracePeriodSeconds");
    assert!(pre_stop > 0, "without a preStop sleep, SIGTERM races the removal of the pod's endpoints");
    assert!(
        grace > pre_stop + drain,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + shutdown_grace_seconds {drain} s \
         (with a margin for the exit), or the kubelet kills requests the server would have finished"
    );
}

#[test]
fn the_images_serve_on_the_deployments_port_and_check_liveness() {
    let base = base();
    let (live_path, _) = base.probe("livenessProbe");
    let http_port = base.named_port("http");
    let pod_user = (
        u64_at(&base.deployment, "/spec/template/spec/securityContext/runAsUser"),
        u64_at(&base.deployment, "/spec/template/spec/securityContext/runAsGroup"),
    );
    let config_in_pod = base.mounted_file("configMap", &base.config_map, &base.config_key);
    let shipped = repo_file(DEFAULT_FILE);
    for name in IMAGE_STAGES {
        let image = image_stage(name);
        assert_eq!(image.exposed_port(), http_port, "stage {name}: EXPOSE");
        // Run as it is (with the settings file it ships), the image listens on 0.0.0.0:EXPOSE.
        let standalone = Settings::from_sources(&shipped, Path::new(DEFAULT_FILE), image.env()).unwrap();
        assert_eq!((standalone.server.host.as_str(), standalone.server.port), ("0.0.0.0", http_port), "stage {name}");
        assert_eq!(image.healthcheck_target(), (live_path.clone(), http_port), "stage {name}: HEALTHCHECK");
        assert_eq!(image.user(), pod_user, "stage {name}: USER and the pods' runAsUser/runAsGroup");
        // The settings file and the default model sit where `huginn serve` looks, under WORKDIR.
        let workdir = Path::new(image.last("WORKDIR"));
        assert_eq!(workdir.join(DEFAULT_FILE), config_in_pod, "stage {name}: WORKDIR and the ConfigMap mount");
        for wanted in [workdir.join(DEFAULT_FILE), workdir.join(DEFAULT_MODEL)] {
            assert!(
                image.copied_to().iter().any(|to| Path::new(to) == wanted.as_path()),
                "stage {name}: nothing copied to {wanted:?}"
            );
        }
        // The Deployment's args, if any, are the image's command.
        if let Some(args) = base.container().get("args") {
            let cmd: Value = serde_json::from_str(image.last("CMD")).expect("CMD in exec (JSON) form");
            assert_eq!(args, &cmd, "stage {name}: CMD and the container's args");
        }
    }
}
