//! Starting a server on 127.0.0.1:0 with the fixture model.

use huginn::server::{AppState, build_state, router};
use huginn::settings::Settings;

pub struct TestServer {
    pub base: String,
    pub state: AppState,
}

pub async fn start_with(settings: Settings) -> TestServer {
    start_model(super::fixture_dir(), settings).await
}

/// A server on the checkpoint in `dir`.
pub async fn start_model(dir: std::path::PathBuf, settings: Settings) -> TestServer {
    let state = tokio::task::spawn_blocking(move || build_state(settings, &dir).unwrap()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    TestServer { base, state }
}

/// The default settings with the process environment applied (so that `HUGINN_MODEL_BACKEND`
/// reaches the servers of the tests).
pub fn settings() -> Settings {
    Settings::from_sources("", std::path::Path::new("<defaults>"), std::env::vars()).unwrap()
}

pub async fn start() -> TestServer {
    start_with(settings()).await
}

pub fn openai(server: &TestServer) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let config =
        async_openai::config::OpenAIConfig::new().with_api_base(format!("{}/v1", server.base)).with_api_key("unused");
    async_openai::Client::with_config(config)
}

/// POSTs JSON; the status and the body parsed as JSON (`Null` when it is not JSON).
pub async fn post_json(base: &str, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new().post(format!("{base}{path}")).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

pub async fn get_status(base: &str, path: &str) -> u16 {
    reqwest::get(format!("{base}{path}")).await.unwrap().status().as_u16()
}

/// A completion that keeps the fixture model busy for seconds (200 tokens x 256 steps).
pub fn long_completion(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "prompt": "hello", "max_tokens": 200, "num_steps": 256, "ignore_eos": true, "stream": stream,
    })
}

/// Opens a streamed completion and reads until its first `data:` chunk arrived.
pub async fn stream_until_first_chunk(base: &str, body: &serde_json::Value) -> reqwest::Response {
    let mut response = reqwest::Client::new().post(format!("{base}/v1/completions")).json(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let chunk = response.chunk().await.unwrap().expect("the stream ended before its first chunk");
        seen.extend_from_slice(&chunk);
    }
    response
}

/// Polls `condition` every 20 ms for up to `seconds`; whether it came true.
pub async fn eventually(seconds: u64, mut condition: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < until {
        if condition() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    condition()
}

/// The value of the series `series` (name and labels as rendered) on a `/metrics` page; a bare
/// name without labels sums every series of that name (e.g. over the `worker` label).
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    let value =
        |line: &str, prefix: &str| -> Option<f64> { line.strip_prefix(prefix)?.strip_prefix(' ')?.trim().parse().ok() };
    if series.contains('{') {
        return page.lines().find_map(|line| value(line, series));
    }
    let values: Vec<f64> = page
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(series)?;
            match rest.strip_prefix('{') {
                Some(labels) => labels.split_once("} ").and_then(|(_, v)| v.trim().parse().ok()),
                None => value(line, series),
            }
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The JSON chunks of an SSE body (without `[DONE]`).
pub fn data_chunks(text: &str) -> Vec<serde_json::Value> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// A choice's `steps_per_token`.
pub fn steps_of(choice: &serde_json::Value) -> Vec<u64> {
    choice["steps_per_token"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect()
}
