//! Bad input, limits, overload, disconnects, deadlines and worker faults, through the HTTP server.

mod common;

use common::server::{eventually, get_status, long_completion, post_json, start, start_with, stream_until_first_chunk};
use huginn::settings::Settings;
use serde_json::{Value, json};

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn settings(change: impl FnOnce(&mut Settings)) -> Settings {
    let mut settings = common::server::settings();
    change(&mut settings);
    settings
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"prompt": "hi", "max_tokens": 2});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// The OpenAI error shape, with a non-empty message; returns `(param, code)`.
fn error_fields(body: &Value) -> (Option<String>, Option<String>) {
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {body}");
    assert!(error["type"].is_string(), "no type: {body}");
    assert!(error.get("param").is_some() && error.get("code").is_some(), "param and code must be present: {body}");
    (error["param"].as_str().map(str::to_string), error["code"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_gets_its_status_and_param() {
    let server = start().await;
    let context = server.state.config.block_size;
    let too_long: Vec<u32> = vec![5; context + 44];
    let too_long_body = json!({"prompt": too_long.clone()});
    let nearly_full: Vec<u32> = vec![5; context - 56];
    let five_stops = json!(["a", "b", "c", "d", "e"]);
    #[rustfmt::skip]
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        // wrong types
        (COMPLETIONS, json!({"prompt": 5}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": [["a"]]}), 400, Some("prompt")),
        (COMPLETIONS, completion(json!({"max_tokens": "ten"})), 400, Some("max_tokens")),
        (COMPLETIONS, completion(json!({"temperature": "hot"})), 400, Some("temperature")),
        (COMPLETIONS, completion(json!({"n": 1.5})), 400, Some("n")),
        (COMPLETIONS, completion(json!({"stream": "yes"})), 400, Some("stream")),
        (COMPLETIONS, completion(json!({"echo": 1})), 400, Some("echo")),
        (COMPLETIONS, completion(json!({"seed": "x"})), 400, Some("seed")),
        (COMPLETIONS, completion(json!({"num_steps": 2.5})), 400, Some("num_steps")),
        (COMPLETIONS, completion(json!({"exit_threshold": "NaN"})), 400, Some("exit_threshold")),
        (COMPLETIONS, completion(json!({"continuous_compute": "on"})), 400, Some("continuous_compute")),
        (COMPLETIONS, completion(json!({"stop": 5})), 400, Some("stop")),
        (COMPLETIONS, completion(json!({"stop": [1, 2]})), 400, Some("stop")),
        (COMPLETIONS, completion(json!({"logit_bias": [1]})), 400, Some("logit_bias")),
        (COMPLETIONS, completion(json!({"model": 7})), 400, Some("model")),
        // out of range
        (COMPLETIONS, completion(json!({"temperature": -1})), 400, Some("temperature")),
        (COMPLETIONS, completion(json!({"temperature": 2.5})), 400, Some("temperature")),
        (COMPLETIONS, completion(json!({"top_p": 0})), 400, Some("top_p")),
        (COMPLETIONS, completion(json!({"top_p": 1.5})), 400, Some("top_p")),
        (COMPLETIONS, completion(json!({"top_k": -2})), 400, Some("top_k")),
        (COMPLETIONS, completion(json!({"min_p": 1.5})), 400, Some("min_p")),
        (COMPLETIONS, completion(json!({"presence_penalty": 3})), 400, Some("presence_penalty")),
        (COMPLETIONS, completion(json!({"frequency_penalty": -2.5})), 400, Some("frequency_penalty")),
        (COMPLETIONS, completion(json!({"repetition_penalty": 0})), 400, Some("repetition_penalty")),
        (COMPLETIONS, completion(json!({"n": 0})), 400, Some("n")),
        (COMPLETIONS, completion(json!({"n": 17})), 400, Some("n")),
        (COMPLETIONS, completion(json!({"logprobs": 21})), 400, Some("logprobs")),
        (COMPLETIONS, completion(json!({"logprobs": -1})), 400, Some("logprobs")),
        (COMPLETIONS, completion(json!({"max_tokens": -1})), 400, Some("max_tokens")),
        (COMPLETIONS, completion(json!({"max_tokens": 4097})), 400, Some("max_tokens")),
        (COMPLETIONS, completion(json!({"num_steps": 0})), 400, Some("num_steps")),
        (COMPLETIONS, completion(json!({"num_steps": 257})), 400, Some("num_steps")),
        (COMPLETIONS, completion(json!({"exit_threshold": -0.5})), 400, Some("exit_threshold")),
        (COMPLETIONS, completion(json!({"exit_criterion": "soon"})), 400, Some("exit_criterion")),
        (COMPLETIONS, completion(json!({"num_steps": 4, "min_steps": 5})), 400, Some("min_steps")),
        (COMPLETIONS, completion(json!({"min_steps": -1})), 400, Some("min_steps")),
        (COMPLETIONS, completion(json!({"max_total_steps": 0})), 400, Some("max_total_steps")),
        (COMPLETIONS, completion(json!({"max_total_steps": 2_000_000})), 400, Some("max_total_steps")),
        (COMPLETIONS, completion(json!({"init_scale": -1})), 400, Some("init_scale")),
        (COMPLETIONS, completion(json!({"stop": five_stops})), 400, Some("stop")),
        (COMPLETIONS, completion(json!({"stop_token_ids": [99999]})), 400, Some("stop_token_ids")),
        (COMPLETIONS, completion(json!({"logit_bias": {"abc": 1}})), 400, Some("logit_bias")),
        (COMPLETIONS, completion(json!({"logit_bias": {"5": 101}})), 400, Some("logit_bias")),
        (COMPLETIONS, completion(json!({"stream_options": {"include_usage": true}})), 400, Some("stream_options")),
        // prompts
        (COMPLETIONS, json!({"max_tokens": 2}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": ""}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": []}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": [1, 99999]}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": [1, -3]}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": too_long}), 400, Some("prompt")),
        (COMPLETIONS, json!({"prompt": nearly_full, "max_tokens": 100}), 400, Some("max_tokens")),
        // unsupported and unknown
        (COMPLETIONS, completion(json!({"suffix": "y"})), 400, Some("suffix")),
        (COMPLETIONS, completion(json!({"best_of": 2})), 400, Some("best_of")),
        (COMPLETIONS, completion(json!({"model": "gpt-9"})), 404, Some("model")),
        // chat
        (CHAT, json!({"max_tokens": 2}), 400, Some("messages")),
        (CHAT, json!({"messages": []}), 400, Some("messages")),
        (CHAT, json!({"messages": "hi"}), 400, Some("messages")),
        (CHAT, json!({"messages": [{"role": "robot", "content": "x"}]}), 400, Some("messages[0].role")),
        (CHAT, json!({"messages": [{"role": "user", "content": 5}]}), 400, Some("messages[0].content")),
        (CHAT, chat(json!({"logprobs": "yes"})), 400, Some("logprobs")),
        (CHAT, chat(json!({"logprobs": true, "top_logprobs": 21})), 400, Some("top_logprobs")),
        (CHAT, chat(json!({"max_completion_tokens": -1})), 400, Some("max_completion_tokens")),
        (CHAT, chat(json!({"tools": []})), 400, Some("tools")),
        (CHAT, chat(json!({"response_format": {"type": "json_schema"}})), 400, Some("response_format")),
        (CHAT, chat(json!({"guided_regex": "(unclosed"})), 400, Some("guided_regex")),
        (CHAT, chat(json!({"num_steps": 999})), 400, Some("num_steps")),
        (CHAT, chat(json!({"model": "gpt-9"})), 404, Some("model")),
        ("/tokenize", json!({"prompt": 5}), 400, Some("prompt")),
        ("/detokenize", json!({"tokens": [99999]}), 400, Some("tokens")),
    ];
    for (path, body, status, param) in &cases {
        let (got, answer) = post_json(&server.base, path, body).await;
        assert_eq!(got, *status, "{path} {body} -> {answer}");
        assert_eq!(error_fields(&answer).0.as_deref(), *param, "{path} {body} -> {answer}");
    }

    // The prompt-length error reports the token counts against the context length.
    let (_, answer) = post_json(&server.base, COMPLETIONS, &too_long_body).await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{} tokens", context + 44)) && message.contains(&context.to_string()),
        "{message}"
    );

    // Raw bodies: malformed JSON, a non-object, over the size limit, a non-JSON content type.
    let client = reqwest::Client::new();
    let limit = server.state.settings.server.max_body_bytes;
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(limit));
    for (body, kind, status, code) in [
        ("{\"prompt\": ".to_string(), "application/json", 400, None),
        ("[1, 2]".to_string(), "application/json", 400, None),
        ("{\"prompt\": \"x\", \"temperature\": 1e999}".to_string(), "application/json", 400, None),
        (huge, "application/json", 413, Some("payload_too_large")),
        ("prompt=hi".to_string(), "application/x-www-form-urlencoded", 415, Some("unsupported_media_type")),
    ] {
        let response =
            client.post(format!("{}{COMPLETIONS}", server.base)).header("content-type", kind).body(body).send().await;
        let response = response.unwrap();
        assert_eq!(response.status().as_u16(), status, "{kind}");
        let answer: Value = response.json().await.unwrap();
        let (param, got_code) = error_fields(&answer);
        assert_eq!(param, None, "{answer}");
        if code.is_some() {
            assert_eq!(got_code.as_deref(), code, "{answer}");
        }
        if status == 413 {
            assert!(answer["error"]["message"].as_str().unwrap().contains(&limit.to_string()), "{answer}");
        }
    }
    // Unknown route (404) and wrong method (405), as JSON errors.
    let response = client.get(format!("{}/v1/embeddings", server.base)).send().await.unwrap();
    assert_eq!(response.status(), 404);
    error_fields(&response.json().await.unwrap());
    let response = client.put(format!("{}{COMPLETIONS}", server.base)).send().await.unwrap();
    assert_eq!(response.status(), 405);
    error_fields(&response.json().await.unwrap());

    // Unknown fields are ignored, as OpenAI-compatible servers do.
    let (status, answer) =
        post_json(&server.base, COMPLETIONS, &completion(json!({"frobnicate": [1, {"x": 2}]}))).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post_json(&server.base, CHAT, &chat(json!({"user": "u1", "metadata": {"a": "b"}}))).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_gets_429_at_once_while_health_and_metrics_answer() {
    let server = start_with(settings(|s| {
        s.engine.queue_capacity = 1;
        s.engine.max_active_sequences = 1;
    }))
    .await;
    // One running (it holds the only sequence slot), one waiting (it fills the queue).
    let running = stream_until_first_chunk(&server.base, &long_completion(true)).await;
    let base = server.base.clone();
    let waiting =
        tokio::spawn(async move { post_json(&base, COMPLETIONS, &json!({"prompt": "a", "max_tokens": 1})).await });
    assert!(eventually(10, || server.state.engine.in_flight() == 2).await, "the second request never queued");

    let response = reqwest::Client::new()
        .post(format!("{}{COMPLETIONS}", server.base))
        .json(&json!({"prompt": "b", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(error_fields(&answer).1.as_deref(), Some("queue_full"));
    assert_eq!(get_status(&server.base, "/health").await, 200);
    assert_eq!(get_status(&server.base, "/metrics").await, 200);

    // The waiting request is served once the running one is gone.
    drop(running);
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_beyond_the_limit_get_429() {
    let server = start_with(settings(|s| s.server.max_concurrent_requests = 1)).await;
    let running = stream_until_first_chunk(&server.base, &long_completion(true)).await;
    let (status, answer) = post_json(&server.base, COMPLETIONS, &completion(json!({}))).await;
    assert_eq!(status, 429, "{answer}");
    let (status, answer) = post_json(&server.base, "/tokenize", &json!({"prompt": "hi"})).await;
    assert_eq!(status, 429, "{answer}");
    // Health, readiness and metrics are not generation requests.
    assert_eq!(get_status(&server.base, "/ready").await, 200);
    drop(running);
    // The slot comes back when the stream ends.
    let mut status = 0;
    for _ in 0..100 {
        status = post_json(&server.base, COMPLETIONS, &completion(json!({}))).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_client_frees_its_sequences_and_memory() {
    let server = start().await;
    let engine = server.state.engine.clone();
    // Streaming: drop the response after the first chunk.
    let stream = stream_until_first_chunk(&server.base, &long_completion(true)).await;
    assert!(eventually(10, || engine.kv_bytes() > 0 && engine.in_flight() == 1).await, "should be running");
    drop(stream);
    assert!(eventually(10, || engine.in_flight() == 0 && engine.kv_bytes() == 0).await, "stream not freed");

    // Not streaming: the client gives up while the request runs.
    let base = server.base.clone();
    let client = tokio::spawn(async move { post_json(&base, COMPLETIONS, &long_completion(false)).await });
    assert!(eventually(10, || engine.kv_bytes() > 0).await, "the request never started");
    client.abort();
    assert!(eventually(10, || engine.in_flight() == 0 && engine.kv_bytes() == 0).await, "request not freed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_deadline_gets_504_and_is_cancelled() {
    let server = start_with(settings(|s| s.server.request_timeout_seconds = 1)).await;
    let engine = server.state.engine.clone();
    // Four choices of 250 tokens x 256 steps: several seconds of work on this model.
    let longer = || {
        let mut body = long_completion(false);
        body["n"] = json!(4);
        body["max_tokens"] = json!(250);
        body
    };
    let (status, answer) = post_json(&server.base, COMPLETIONS, &longer()).await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(error_fields(&answer).1.as_deref(), Some("timeout"));
    assert!(eventually(10, || engine.in_flight() == 0 && engine.kv_bytes() == 0).await);

    // Streaming: an error event, then [DONE].
    let response = reqwest::Client::new()
        .post(format!("{}{COMPLETIONS}", server.base))
        .json(&{
            let mut body = longer();
            body["stream"] = json!(true);
            body
        })
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| e.starts_with("data: ")).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    let error: Value = serde_json::from_str(&events[events.len() - 2]["data: ".len()..]).unwrap();
    assert_eq!(error_fields(&error).1.as_deref(), Some("timeout"));
    assert!(eventually(10, || engine.in_flight() == 0 && engine.kv_bytes() == 0).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_fault_fails_its_requests_and_the_worker_restarts() {
    let server = start_with(settings(|s| s.engine.restart_backoff_ms = 3000)).await;
    let engine = server.state.engine.clone();
    let mut streamed = stream_until_first_chunk(&server.base, &long_completion(true)).await;
    let base = server.base.clone();
    let plain = tokio::spawn(async move { post_json(&base, COMPLETIONS, &long_completion(false)).await });
    assert!(eventually(10, || engine.sequences() == 2).await, "both requests should be running");
    assert!(engine.inject_fault(0));

    // Both in-flight requests fail with a generic message and a request id (the fault's details
    // go to the server's log only): an error event on the stream, a 500 otherwise.
    let mut rest = Vec::new();
    while let Some(chunk) = streamed.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.contains("\"internal_error\"") && rest.contains("req-"), "{rest}");
    assert!(!rest.contains("injected fault") && rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let (status, answer) = plain.await.unwrap();
    assert_eq!(status, 500, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    let request_id = answer["error"]["request_id"].as_str().unwrap();
    assert!(request_id.starts_with("req-") && message.contains(request_id), "{answer}");
    assert!(!message.contains("injected fault"), "internal details reach the client: {answer}");
    assert_eq!(answer["error"]["code"], "internal_error", "{answer}");

    // While the worker restarts, readiness fails; requests sent meanwhile wait for it.
    assert_eq!(get_status(&server.base, "/ready").await, 503);
    assert_eq!(get_status(&server.base, "/health").await, 200);
    let base = server.base.clone();
    let meanwhile = tokio::spawn(async move { post_json(&base, COMPLETIONS, &completion(json!({}))).await });
    assert!(eventually(20, || engine.ready()).await, "the worker did not come back");
    assert_eq!(get_status(&server.base, "/ready").await, 200);
    assert_eq!(engine.restarts(), 1);
    let (status, answer) = meanwhile.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(engine.kv_bytes(), 0);
}

mod shutdown {
    //! The binary itself: SIGTERM drains in-flight requests, then the process exits 0.

    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;

    struct Served {
        child: Child,
        base: String,
        log: Arc<Mutex<String>>,
    }

    /// Starts `huginn serve` on an ephemeral port with the fixture model; returns once it is ready.
    fn serve(grace_seconds: u64) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_huginn"))
            .args(["serve", "--port", "0", "--model"])
            .arg(common::fixture_dir())
            .env("HUGINN_SERVER_SHUTDOWN_GRACE_SECONDS", grace_seconds.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("the server exited before it was ready").unwrap();
            if let Some(at) = line.find("huginn ready:") {
                break line[at..].split(" on ").last().unwrap().trim().to_string();
            }
        };
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Served { child, base, log }
    }

    fn signal(child: &Child, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    async fn exit_code(child: &mut Child, seconds: u64) -> Option<i32> {
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        panic!("the server did not exit within {seconds} s");
    }

    async fn gauge(base: &str, name: &str) -> f64 {
        let page = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
        common::server::metric_value(&page, name).unwrap_or(0.0)
    }

    async fn wait_running(base: &str) {
        for _ in 0..500 {
            if gauge(base, "huginn_requests_running").await >= 1.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the request never started");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
        let mut served = serve(60);
        let base = served.base.clone();
        let in_flight = tokio::spawn(async move { post_json(&base, COMPLETIONS, &long_completion(false)).await });
        wait_running(&served.base).await;
        signal(&served.child, "TERM");

        // Readiness fails at once and new work is refused; liveness still answers.
        let mut ready = 200;
        for _ in 0..100 {
            ready = get_status(&served.base, "/ready").await;
            if ready == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ready, 503);
        let (status, answer) = post_json(&served.base, COMPLETIONS, &completion(json!({}))).await;
        assert_eq!(status, 503, "{answer}");
        assert_eq!(error_fields(&answer).1.as_deref(), Some("unavailable"));
        assert_eq!(get_status(&served.base, "/health").await, 200);

        // The request accepted before the signal gets its whole answer, then the process exits 0.
        let (status, answer) = in_flight.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], 200);
        assert_eq!(exit_code(&mut served.child, 30).await, Some(0));
        assert!(served.log.lock().unwrap().contains("huginn stopped"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn past_the_grace_period_the_process_exits_0_and_cuts_what_is_left() {
        let mut served = serve(1);
        let base = served.base.clone();
        let mut body = long_completion(false);
        body["n"] = json!(4);
        body["max_tokens"] = json!(250);
        let in_flight = tokio::spawn(async move {
            reqwest::Client::new().post(format!("{base}{COMPLETIONS}")).json(&body).send().await
        });
        wait_running(&served.base).await;
        signal(&served.child, "INT");
        // Four choices of 250 tokens take far longer than the grace period of 1 s: the process
        // ends because the grace period ran out (the log says so), not because the work was done.
        assert_eq!(exit_code(&mut served.child, 120).await, Some(0));
        let cut = in_flight.await.unwrap();
        assert!(cut.is_err() || cut.unwrap().status() != 200, "the request should not have completed");
        let log = served.log.lock().unwrap().clone();
        assert!(log.contains("grace period over"), "{log}");
        assert!(log.contains("cancelled at shutdown"), "{log}");
    }
}

mod fuzz {
    //! Property tests over request JSON: the server never panics and rejects with a 4xx.

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    const KEYS: &[&str] = &[
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "echo",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "user",
        "num_steps",
        "exit_criterion",
        "exit_threshold",
        "min_steps",
        "max_total_steps",
        "init_scale",
        "continuous_compute",
        "top_k",
        "min_p",
        "repetition_penalty",
        "stop_token_ids",
        "ignore_eos",
        "tokens",
        "suffix",
        "best_of",
        "response_format",
    ];

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-400i64..400).prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            (-3.0f64..3.0).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            prop::sample::select(vec!["user", "system", "assistant", "kl", "none", "text", "hi", ""])
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![prop::sample::select(KEYS).prop_map(String::from), "[a-z_]{1,8}", "role", "content", "type"]
    }

    /// Objects made of the parameters the server reads, with plausible or arbitrary values.
    fn request() -> impl Strategy<Value = Value> {
        let message = (prop::sample::select(vec!["user", "system", "assistant", "tool"]), any_json())
            .prop_map(|(role, content)| json!({"role": role, "content": content}));
        let value = prop_oneof![
            3 => any_json(),
            1 => prop::collection::vec(message, 0..3).prop_map(Value::Array),
            1 => prop::collection::vec(0u32..400, 0..5).prop_map(|ids| json!(ids)),
            1 => Just(json!("1+1=")),
        ];
        prop::collection::btree_map(prop::sample::select(KEYS), value, 0..10)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    #[test]
    fn any_request_body_gets_an_answer_and_every_rejection_is_a_4xx() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = runtime.block_on(start_with(settings(|s| {
            s.limits.max_tokens = 3;
            s.limits.max_num_steps = 3;
            s.limits.max_n = 2;
            // The defaults within the limits (start-up checks them).
            s.generation.max_tokens = 3;
            s.generation.num_steps = Some(3);
        })));
        let client = reqwest::Client::new();
        let paths = vec![COMPLETIONS, CHAT, "/tokenize", "/detokenize"];
        let body = prop_oneof![
            2 => request().prop_map(|v| v.to_string().into_bytes()),
            1 => any_json().prop_map(|v| v.to_string().into_bytes()),
            1 => prop::collection::vec(any::<u8>(), 0..64),
        ];
        let config = Config { cases: 300, failure_persistence: None, ..Config::default() };
        TestRunner::new(config)
            .run(&(prop::sample::select(paths), body), |(path, body)| {
                let (status, answer) = runtime.block_on(async {
                    let response = client
                        .post(format!("{}{path}", server.base))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("the server answers every request");
                    let status = response.status().as_u16();
                    (status, response.text().await.unwrap_or_default())
                });
                let shown = String::from_utf8_lossy(&body);
                prop_assert!(status == 200 || (400..500).contains(&status), "{path} {shown} -> {status} {answer}");
                if status != 200 {
                    let error: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
                    prop_assert!(error["error"]["message"].is_string(), "{path} {shown} -> {answer}");
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(server.state.engine.restarts(), 0);
    }
}
