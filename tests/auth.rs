//! Optional API keys: 401 with an OpenAI error without a valid key, open paths stay open, the
//! OpenAI SDK works with a configured key.

mod common;

use async_openai::types::completions::{CreateCompletionRequestArgs, CreateCompletionResponse};
use common::server::start_with;
use serde_json::{Value, json};

async fn keyed_server(open_paths: &[&str]) -> (common::server::TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-keys");
    std::fs::write(&file, "# keys\nsk-first\nsk-second\n").unwrap();
    let mut settings = common::server::settings();
    settings.server.api_keys_file = Some(file);
    settings.server.auth_open_paths = open_paths.iter().map(|p| p.to_string()).collect();
    (start_with(settings).await, dir)
}

async fn get(base: &str, path: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    (status, challenge, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn requests_need_one_of_the_keys_except_on_open_paths() {
    let (server, _dir) = keyed_server(&["/health", "/ready", "/metrics"]).await;
    let base = server.base.as_str();

    let (status, challenge, body) = get(base, "/v1/models", None).await;
    assert_eq!(status, 401);
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(body["error"]["message"].as_str().unwrap().contains("Missing API key"));
    assert!(body["error"].get("param").is_some());

    let (status, _, body) = get(base, "/v1/models", Some("sk-third")).await;
    assert_eq!(status, 401);
    assert!(!body.to_string().contains("sk-"), "the error must not echo keys: {body}");
    assert_eq!(get(base, "/v1/models", Some("sk-first")).await.0, 200);
    assert_eq!(get(base, "/v1/models", Some("sk-second")).await.0, 200);

    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(base, open, None).await.0, 200, "{open}");
    }
    // A POST without a key is refused before its body is looked at.
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // The OpenAI SDK sends its key as a bearer token.
    let config =
        async_openai::config::OpenAIConfig::new().with_api_base(format!("{base}/v1")).with_api_key("sk-second");
    let client = async_openai::Client::with_config(config);
    let request = CreateCompletionRequestArgs::default()
        .model("huginn-tiny-ref")
        .prompt("The recurrent block")
        .max_tokens(2u32)
        .build()
        .unwrap();
    let response: CreateCompletionResponse = client.completions().create(request).await.unwrap();
    assert_eq!(response.choices.len(), 1);
}

#[tokio::test]
async fn open_paths_are_configurable() {
    let (server, _dir) = keyed_server(&[]).await;
    assert_eq!(get(&server.base, "/health", None).await.0, 401);
    assert_eq!(get(&server.base, "/health", Some("sk-first")).await.0, 200);
}
