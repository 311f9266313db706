//! The server through a real OpenAI client (async-openai) and raw HTTP.

mod common;

use async_openai::types::chat::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};
use async_openai::types::completions::{CreateCompletionRequestArgs, CreateCompletionResponse};
use candle_core::DType;
use common::server::{openai, start};
use common::*;
use futures::StreamExt;
use huginn::generate::GenerationParams;
use huginn::model::{CacheStrategy, ExitCriterion, ExitRule};
use serde_json::{Value, json};

const MODEL: &str = "huginn-tiny-ref";

/// Greedy, zero initial state: what `huginn generate` produces for these settings.
fn reference(prompt: &[u32], num_steps: usize, exit: ExitRule, max_tokens: usize) -> (Vec<u32>, Vec<usize>) {
    let model = load(&fixture_dir(), DType::F32);
    let mut p = GenerationParams::new(num_steps);
    p.max_tokens = max_tokens;
    p.init_scale = 0.0;
    p.exit = exit;
    p.cache = CacheStrategy::Shared(1);
    p.stop_token_ids = vec![0, 1, 2];
    let out = generate(&model, prompt, &p).unwrap();
    (out.token_ids, out.steps_per_token)
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_through_the_sdk_equals_generate() {
    let server = start().await;
    let client = openai(&server);
    let body = json!({"model": MODEL, "prompt": "The recurrent block iterates", "max_tokens": 8, "temperature": 0,
        "num_steps": 8, "init_scale": 0});
    let response: CreateCompletionResponse = client.completions().create_byot(body).await.unwrap();
    let (ids, _) = reference(&PROMPT, 8, ExitRule::default(), 8);
    let model = load(&fixture_dir(), DType::F32);
    let tokenizer = huginn::text::TextTokenizer::load(&fixture_dir(), model.config()).unwrap();
    assert_eq!(response.choices[0].text, tokenizer.decode(&ids).unwrap());
    let usage = response.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 8));

    // The typed request path of the SDK works too.
    let request =
        CreateCompletionRequestArgs::default().model(MODEL).prompt("12+34=").max_tokens(4u32).n(2u8).build().unwrap();
    let response = client.completions().create(request).await.unwrap();
    assert_eq!(response.choices.len(), 2);
    assert_eq!(response.choices.iter().map(|c| c.index).collect::<Vec<_>>(), vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_plain_and_streamed_with_usage() {
    let server = start().await;
    let client = openai(&server);
    let message = ChatCompletionRequestUserMessageArgs::default().content("472+389=").build().unwrap();
    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages([message.clone().into()])
        .max_tokens(5u32)
        .n(2u8)
        .build()
        .unwrap();
    let response = client.chat().create(request).await.unwrap();
    assert_eq!(response.choices.len(), 2);
    assert_eq!(response.object, "chat.completion");
    let usage = response.usage.unwrap();
    assert_eq!(usage.completion_tokens, 10);

    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages([message.into()])
        .max_tokens(6u32)
        .stream(true)
        .stream_options(async_openai::types::chat::ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        })
        .build()
        .unwrap();
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let (mut first_role, mut contents, mut usage, mut finish) = (None, 0usize, None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            usage = Some(u);
        }
        for choice in chunk.choices {
            if first_role.is_none() {
                first_role = Some(choice.delta.role);
            }
            contents += choice.delta.content.as_deref().map_or(0, str::len);
            finish = finish.or(choice.finish_reason);
        }
    }
    assert!(matches!(first_role, Some(Some(_))), "the first delta carries the role");
    assert_eq!(usage.unwrap().completion_tokens, 6);
    assert!(finish.is_some());
    assert!(contents > 0, "some text was streamed");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_completion_reports_steps_and_usage() {
    let server = start().await;
    let client = openai(&server);
    let body = json!({"model": MODEL, "prompt": "12+34=", "max_tokens": 6, "stream": true, "num_steps": 5,
        "init_scale": 0, "stream_options": {"include_usage": true}});
    let mut stream = client.completions().create_stream_byot::<Value, Value>(body).await.unwrap();
    let (mut steps, mut usage) = (Vec::new(), Value::Null);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
        for choice in chunk["choices"].as_array().unwrap() {
            steps.extend(choice["steps_per_token"].as_array().into_iter().flatten().map(|s| s.as_u64().unwrap()));
        }
    }
    assert_eq!(steps, vec![5; 6]);
    assert_eq!(usage["recurrence_steps"], 30);
    assert_eq!(usage["mean_steps_per_token"], 5.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn compute_budget_fields() {
    let server = start().await;
    let base = &server.base;
    // Adaptive exit: same ids and steps as generate with the same rule.
    let (ids, steps) = reference(&[313, 14, 316, 32], 32, ExitRule::new(ExitCriterion::Kl, Some(5e-4), 0).unwrap(), 6);
    let (status, body) = post(
        base,
        "/v1/completions",
        json!({"prompt": [313, 14, 316, 32], "max_tokens": 6, "num_steps": 32,
        "exit_criterion": "kl", "exit_threshold": 5e-4, "init_scale": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<usize> = body["choices"][0]["steps_per_token"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(got, steps);
    assert!(got[1..].iter().all(|&s| s < 32));
    assert_eq!(body["usage"]["recurrence_steps"], steps.iter().sum::<usize>());
    assert_eq!(body["choices"][0]["text"], serde_json::to_value(huginn_decode(&ids)).unwrap());

    // A step budget ends the choice with `length`.
    let (_, body) = post(base, "/v1/completions", json!({"prompt": "hi", "max_tokens": 50, "num_steps": 4, "max_total_steps": 10, "init_scale": 0, "ignore_eos": true})).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["steps_per_token"], json!([4, 4, 2]));

    // min_steps and top_k / min_p / repetition_penalty / stop_token_ids are accepted.
    let (status, body) = post(base, "/v1/completions", json!({"prompt": "hi", "max_tokens": 3, "num_steps": 6, "exit_criterion": "latent-diff",
        "exit_threshold": 1e9, "min_steps": 2, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [5], "ignore_eos": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["steps_per_token"], json!([6, 3, 3]));
}

#[tokio::test(flavor = "multi_thread")]
async fn speculative_requests_match_plain_ones_and_report_their_drafts() {
    let server = start().await;
    let base = &server.base;
    let plain = json!({"prompt": "The recurrent block", "max_tokens": 12, "num_steps": 8, "init_scale": 0,
        "ignore_eos": true});
    let (_, reference) = post(base, "/v1/completions", plain.clone()).await;
    assert!(reference["usage"].get("draft_tokens").is_none(), "no speculation, no draft counts");
    let mut speculative = plain.clone();
    speculative["draft_steps"] = json!(2);
    speculative["draft_tokens"] = json!(3);
    let (status, body) = post(base, "/v1/completions", speculative.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], reference["choices"][0]["text"]);
    let usage = &body["usage"];
    let (drafted, accepted) =
        (usage["draft_tokens"].as_u64().unwrap(), usage["accepted_draft_tokens"].as_u64().unwrap());
    assert!(drafted > 0 && accepted <= drafted, "{usage}");
    let steps: u64 =
        body["choices"][0]["steps_per_token"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).sum();
    assert_eq!(usage["recurrence_steps"].as_u64(), Some(steps));

    // Streamed: the same counts in the usage chunk.
    speculative["stream"] = json!(true);
    speculative["stream_options"] = json!({"include_usage": true});
    let client = openai(&server);
    let mut stream = client.completions().create_stream_byot::<Value, Value>(speculative).await.unwrap();
    let mut streamed = Value::Null;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if !chunk["usage"].is_null() {
            streamed = chunk["usage"].clone();
        }
    }
    assert_eq!(
        (streamed["draft_tokens"].as_u64(), streamed["accepted_draft_tokens"].as_u64()),
        (Some(drafted), Some(accepted))
    );
}

fn huginn_decode(ids: &[u32]) -> String {
    let model = load(&fixture_dir(), DType::F32);
    huginn::text::TextTokenizer::load(&fixture_dir(), model.config()).unwrap().decode(ids).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_strings_cut_the_text() {
    let server = start().await;
    let base = json!({"prompt": "The recurrent block iterates", "max_tokens": 8, "num_steps": 8, "init_scale": 0});
    let (_, free) = post(&server.base, "/v1/completions", base.clone()).await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(3).take(2).collect();
    let mut with_stop = base.clone();
    with_stop["stop"] = json!([stop.clone(), "never-there"]);
    let (_, body) = post(&server.base, "/v1/completions", with_stop).await;
    let cut = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_with_logprobs_scores_the_prompt() {
    let server = start().await;
    let (status, body) = post(
        &server.base,
        "/v1/completions",
        json!({"prompt": "The recurrent block iterates", "max_tokens": 0,
        "echo": true, "logprobs": 1, "num_steps": 4, "init_scale": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "The recurrent block iterates");
    let logprobs = &choice["logprobs"];
    let values = logprobs["token_logprobs"].as_array().unwrap();
    assert_eq!(values.len(), 7);
    assert!(values[0].is_null());
    // Against the model directly: log-softmax of the prompt logits at the previous position.
    let model = load(&fixture_dir(), DType::F32);
    let logits = prompt_logits(&model, &PROMPT, 4).to_vec2::<f32>().unwrap();
    for i in 1..7 {
        let expected = huginn::model::exit::log_softmax(&logits[i - 1])[PROMPT[i] as usize];
        assert!((values[i].as_f64().unwrap() - expected).abs() < 1e-4, "position {i}");
        assert_eq!(logprobs["top_logprobs"][i].as_object().unwrap().len(), 1);
    }
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 7);

    // Generated tokens carry logprobs too, and chat takes logprobs + top_logprobs.
    let (_, body) =
        post(&server.base, "/v1/completions", json!({"prompt": "hi", "max_tokens": 3, "logprobs": 2})).await;
    assert_eq!(body["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().len(), 2);
    let (_, body) = post(
        &server.base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 2, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_the_same_alone_or_beside_15_other_requests() {
    let server = start().await;
    let rules = [
        json!({}),
        json!({"exit_criterion": "kl", "exit_threshold": 5e-4}),
        json!({"exit_criterion": "latent-diff"}),
        json!({"exit_criterion": "entropy-diff"}),
    ];
    let bodies: Vec<Value> = (0..16)
        .map(|i| {
            let prompt = ["The recurrent block iterates", "12+34=", "def add(a, b):", "hello"][i % 4];
            let num_steps = [4, 9, 16, 32][i / 4];
            let mut body = json!({"prompt": prompt, "max_tokens": 6 + i % 3, "num_steps": num_steps, "init_scale": 0, "ignore_eos": true});
            for (k, v) in rules[i % 4].as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        })
        .collect();
    let mut alone = Vec::new();
    for body in &bodies {
        alone.push(post(&server.base, "/v1/completions", body.clone()).await.1);
    }
    let together =
        futures::future::join_all(bodies.iter().map(|b| post(&server.base, "/v1/completions", b.clone()))).await;
    for (i, ((_, concurrent), single)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(concurrent["choices"][0]["text"], single["choices"][0]["text"], "request {i}");
        assert_eq!(concurrent["choices"][0]["steps_per_token"], single["choices"][0]["steps_per_token"], "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_request_finishes_before_long_ones() {
    let server = start().await;
    let long = json!({"prompt": "The recurrent block iterates", "max_tokens": 16, "num_steps": 64, "ignore_eos": true});
    let short = json!({"prompt": "The recurrent block iterates", "max_tokens": 16, "num_steps": 4, "ignore_eos": true});
    // Completion order, not wall time: the short request must not wait for the long ones.
    let finished = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let run = |body: Value, name: &'static str| {
        let (base, finished) = (server.base.clone(), finished.clone());
        tokio::spawn(async move {
            let (status, _) = post_owned(base, body).await;
            assert_eq!(status, 200);
            finished.lock().unwrap().push(name);
        })
    };
    let mut handles: Vec<_> = (0..8).map(|_| run(long.clone(), "long")).collect();
    handles.push(run(short, "short"));
    for handle in handles {
        handle.await.unwrap();
    }
    let order = finished.lock().unwrap().clone();
    assert_eq!(order[0], "short", "{order:?}");
}

async fn post_owned(base: String, body: Value) -> (u16, Value) {
    post(&base, "/v1/completions", body).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_framing_and_error_bodies() {
    let server = start().await;
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.base))
        .json(&json!({"prompt": "hi", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert_eq!(events.len(), 3 + 1 + 1, "three tokens, the finish chunk, [DONE]");

    for (path, body, status, param) in [
        ("/v1/completions", json!({"prompt": "x", "temperature": -1}), 400, Some("temperature")),
        ("/v1/completions", json!({"prompt": "x", "top_p": 0}), 400, Some("top_p")),
        ("/v1/completions", json!({"prompt": "x", "num_steps": 0}), 400, Some("num_steps")),
        ("/v1/completions", json!({"prompt": "x", "num_steps": 4, "min_steps": 5}), 400, Some("min_steps")),
        ("/v1/completions", json!({"prompt": "x", "exit_criterion": "soon"}), 400, Some("exit_criterion")),
        ("/v1/completions", json!({"prompt": "x", "num_steps": 4, "draft_steps": 4}), 400, Some("draft_steps")),
        ("/v1/completions", json!({"prompt": "x", "draft_steps": -1}), 400, Some("draft_steps")),
        ("/v1/completions", json!({"prompt": "x", "draft_steps": "two"}), 400, Some("draft_steps")),
        (
            "/v1/completions",
            json!({"prompt": "x", "draft_steps": 1, "continuous_compute": true}),
            400,
            Some("draft_steps"),
        ),
        ("/v1/completions", json!({"prompt": "x", "draft_steps": 1, "draft_tokens": 0}), 400, Some("draft_tokens")),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "draft_steps": 1, "draft_tokens": 17}),
            400,
            Some("draft_tokens"),
        ),
        ("/v1/completions", json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, Some("stop")),
        ("/v1/completions", json!({"prompt": [1, 99999]}), 400, Some("prompt")),
        ("/v1/completions", json!({"prompt": "x", "suffix": "y"}), 400, Some("suffix")),
        ("/v1/completions", json!({"prompt": "x", "model": "gpt-9"}), 404, Some("model")),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tools": []}),
            400,
            Some("tools"),
        ),
        ("/v1/chat/completions", json!({"messages": []}), 400, Some("messages")),
    ] {
        let (got, body) = post(&server.base, path, body.clone()).await;
        assert_eq!(got, status, "{body}");
        let error = &body["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        assert!(error["type"].is_string() && error.get("code").is_some(), "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
    }
    let response =
        reqwest::Client::new().post(format!("{}/v1/completions", server.base)).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), 400);
    // A declared non-JSON body (curl -d without a header sends a form) is 415; JSON with a charset is fine.
    for (kind, status) in
        [("application/x-www-form-urlencoded", 415), ("text/plain", 415), ("application/json; charset=utf-8", 200)]
    {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/completions", server.base))
            .header("content-type", kind)
            .body(r#"{"prompt": "hi", "max_tokens": 1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{kind}");
        if status == 415 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
        }
    }
    let response = reqwest::get(format!("{}/v2/nothing", server.base)).await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let response = reqwest::get(format!("{}/v1/completions", server.base)).await.unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn models_health_ready_tokenize() {
    let server = start().await;
    let models: Value = reqwest::get(format!("{}/v1/models", server.base)).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(reqwest::get(format!("{}/health", server.base)).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("{}/ready", server.base)).await.unwrap().status(), 200);
    let (status, body) = post(&server.base, "/tokenize", json!({"prompt": "The recurrent block iterates"})).await;
    assert_eq!(status, 200);
    assert_eq!(body["tokens"], json!(PROMPT));
    let (_, body) = post(&server.base, "/detokenize", json!({"tokens": PROMPT})).await;
    assert_eq!(body["prompt"], "The recurrent block iterates");
    server.state.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(reqwest::get(format!("{}/ready", server.base)).await.unwrap().status(), 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_and_http_give_the_same_completion() {
    let server = start().await;
    let fixture = fixture_dir();
    let cases = [
        (json!({"num_steps": 4, "init_scale": 0}), vec!["--num-steps", "4", "--init-scale", "0"]),
        (
            json!({"num_steps": 12, "exit_criterion": "latent-diff", "exit_threshold": 0.05, "init_scale": 0}),
            vec![
                "--num-steps",
                "12",
                "--exit-criterion",
                "latent-diff",
                "--exit-threshold",
                "0.05",
                "--init-scale",
                "0",
            ],
        ),
        (
            json!({"num_steps": 3, "temperature": 0.8, "top_k": 20, "seed": 5}),
            vec!["--num-steps", "3", "--temperature", "0.8", "--top-k", "20", "--seed", "5"],
        ),
    ];
    for (extra, flags) in cases {
        let mut body = json!({"model": MODEL, "prompt": "The recurrent block iterates", "max_tokens": 10});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, http) = post(&server.base, "/v1/completions", body.clone()).await;
        assert_eq!(status, 200, "{http}");
        let args: Vec<String> = ["generate", "--model", fixture.to_str().unwrap(), "--format", "json"]
            .into_iter()
            .chain(["--prompt", "The recurrent block iterates", "--max-tokens", "10"])
            .chain(flags)
            .map(String::from)
            .collect();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_huginn")).args(&args).output().unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(http["choices"][0]["text"], cli["text"], "{body}");
        let steps: u64 = cli["steps_per_token"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).sum();
        assert_eq!(http["usage"]["completion_tokens"], cli["token_ids"].as_array().unwrap().len(), "{body}");
        assert_eq!(http["usage"]["recurrence_steps"], steps, "{body}");
        assert_eq!(http["choices"][0]["finish_reason"], cli["finish_reason"], "{body}");
    }
}
