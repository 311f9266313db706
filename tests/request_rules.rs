//! Rules of a request that a hostile-but-fair client run found broken: server-wide defaults give
//! way where they cannot apply, a request that could never be queued is a 400, a temperature near
//! zero is greedy, streamed echo/logprobs equal the non-streamed answer, and a client that leaves
//! before its answer is still counted.

mod common;

use common::server::{data_chunks, metric_value, post_json, start, start_with, steps_of};
use serde_json::{Value, json};

fn with(body: &Value, extra: Value) -> Value {
    let mut body = body.clone();
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_wide_draft_steps_gives_way_and_can_be_turned_off() {
    let mut settings = common::server::settings();
    settings.generation.draft_steps = Some(2);
    let server = start_with(settings).await;
    let base = &server.base;
    let body = json!({"prompt": "The recurrent block", "max_tokens": 6, "init_scale": 0, "ignore_eos": true});
    // The default applies: the request speculates.
    let (status, spec) = post_json(base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{spec}");
    assert!(spec["usage"]["draft_tokens"].as_u64().is_some_and(|d| d > 0), "{spec}");
    // `draft_steps: 0` turns it off: plain decoding, no draft counts.
    let (status, off) = post_json(base, "/v1/completions", &with(&body, json!({"draft_steps": 0}))).await;
    assert_eq!(status, 200, "{off}");
    assert!(off["usage"].get("draft_tokens").is_none(), "{off}");
    assert_eq!(steps_of(&off["choices"][0]), vec![4; 6], "every token at the model's 4 steps");
    // Where the default cannot apply to what the request asks, it gives way instead of a 400 naming
    // a field the client never sent.
    for extra in [
        json!({"num_steps": 1}),
        json!({"num_steps": 2, "draft_steps": null}),
        json!({"continuous_compute": true}),
        json!({"sampler": "parallel"}),
        json!({"sampler": "parallel", "inner_steps": 2}),
    ] {
        let (status, response) = post_json(base, "/v1/completions", &with(&body, extra.clone())).await;
        assert_eq!(status, 200, "{extra}: {response}");
        assert!(response["usage"].get("draft_tokens").is_none(), "{extra}: {response}");
    }
    // What the request itself sends is still checked, and the error names what it sent.
    for (extra, param) in [
        (json!({"num_steps": 1, "draft_steps": 1}), "draft_steps"),
        (json!({"draft_steps": 4}), "draft_steps"),
        (json!({"draft_steps": -1}), "draft_steps"),
        (json!({"draft_steps": 2, "continuous_compute": true}), "draft_steps"),
        (json!({"draft_steps": 2, "sampler": "parallel"}), "sampler"),
    ] {
        let (status, response) = post_json(base, "/v1/completions", &with(&body, extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {response}");
        assert_eq!(response["error"]["param"].as_str(), Some(param), "{extra}: {response}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_wide_parallel_sampler_and_min_steps_give_way() {
    let mut settings = common::server::settings();
    settings.generation.sampler = huginn::generate::SamplerKind::Parallel;
    settings.generation.min_steps = 3;
    let server = start_with(settings).await;
    let body = json!({"prompt": "The recurrent block", "max_tokens": 4, "init_scale": 0, "ignore_eos": true});
    let (status, response) = post_json(&server.base, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    assert!(response["usage"]["sampler_steps"].is_u64(), "the default sampler applies: {response}");
    for extra in [
        json!({"draft_steps": 2}),
        json!({"continuous_compute": true}),
        json!({"exit_criterion": "kl"}),
        json!({"num_steps": 2}),
    ] {
        let (status, response) = post_json(&server.base, "/v1/completions", &with(&body, extra.clone())).await;
        assert_eq!(status, 200, "{extra}: {response}");
    }
    let (_, sequential) =
        post_json(&server.base, "/v1/completions", &with(&body, json!({"exit_criterion": "kl"}))).await;
    assert!(sequential["usage"].get("sampler_steps").is_none(), "{sequential}");
    // A request that asks for both is refused, naming a field it sent.
    let both = with(&body, json!({"exit_criterion": "kl", "inner_steps": 2}));
    let (status, response) = post_json(&server.base, "/v1/completions", &both).await;
    assert_eq!((status, response["error"]["param"].as_str()), (400, Some("exit_criterion")), "{response}");
}

#[tokio::test(flavor = "multi_thread")]
async fn more_prompts_than_the_queues_hold_is_a_400_naming_prompt() {
    let mut settings = common::server::settings();
    settings.engine.queue_capacity = 4;
    let server = start_with(settings).await;
    let prompts = |count: usize| json!({"prompt": vec!["1+1="; count], "max_tokens": 1});
    let (status, response) = post_json(&server.base, "/v1/completions", &prompts(5)).await;
    assert_eq!(status, 400, "{response}");
    assert_eq!(response["error"]["param"], "prompt");
    assert!(response["error"]["message"].as_str().unwrap().contains("at most 4"), "{response}");
    let (status, response) = post_json(&server.base, "/v1/completions", &prompts(4)).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["choices"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_temperature_below_the_floor_is_greedy_in_every_decoder() {
    let server = start().await;
    let body = json!({"prompt": "The recurrent block", "max_tokens": 6, "init_scale": 0, "ignore_eos": true,
        "logprobs": 1});
    for extra in
        [json!({}), json!({"draft_steps": 2, "num_steps": 6}), json!({"sampler": "parallel", "inner_steps": 2})]
    {
        let (_, greedy) = post_json(&server.base, "/v1/completions", &with(&body, extra.clone())).await;
        for temperature in [1e-40, 1e-30, 1e-6] {
            let request = with(&with(&body, extra.clone()), json!({"temperature": temperature, "seed": 3}));
            let (status, response) = post_json(&server.base, "/v1/completions", &request).await;
            assert_eq!(status, 200, "{response}");
            let (a, b) = (&greedy["choices"][0], &response["choices"][0]);
            assert_eq!(a["text"], b["text"], "{extra} at {temperature}");
            assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"], "{extra} at {temperature}");
            let logprobs = b["logprobs"]["token_logprobs"].as_array().unwrap();
            assert!(logprobs.iter().all(|l| l.as_f64().is_some_and(f64::is_finite)), "{response}");
        }
    }
}

/// The text and the logprobs entries (tokens, log-probabilities, text offsets) of one choice, from
/// a non-streamed body or put together from streamed chunks.
#[derive(Debug, PartialEq)]
struct Answer {
    text: String,
    tokens: Vec<Value>,
    logprobs: Vec<Value>,
    offsets: Vec<Value>,
}

fn answer(choices: &[&Value]) -> Answer {
    let mut out = Answer { text: String::new(), tokens: vec![], logprobs: vec![], offsets: vec![] };
    for choice in choices {
        out.text.push_str(choice["text"].as_str().unwrap_or(""));
        let lp = &choice["logprobs"];
        if lp.is_object() {
            out.tokens.extend(lp["tokens"].as_array().unwrap().iter().cloned());
            out.logprobs.extend(lp["token_logprobs"].as_array().unwrap().iter().cloned());
            out.offsets.extend(lp["text_offset"].as_array().unwrap().iter().cloned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_echo_and_logprobs_equal_the_non_streamed_answer() {
    let server = start().await;
    let client = reqwest::Client::new();
    for (echo, logprobs) in [(false, None), (false, Some(1)), (true, None), (true, Some(1)), (true, Some(0))] {
        for max_tokens in [0, 3] {
            let mut body = json!({"prompt": "12+34=", "max_tokens": max_tokens, "echo": echo, "init_scale": 0,
                "ignore_eos": true});
            if let Some(k) = logprobs {
                body["logprobs"] = json!(k);
            }
            if max_tokens == 0 && !(echo && logprobs.is_some()) {
                continue;
            }
            let (status, whole) = post_json(&server.base, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{whole}");
            let expected = answer(&[&whole["choices"][0]]);
            body["stream"] = json!(true);
            let text = client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
            let chunks = data_chunks(&text.text().await.unwrap());
            let parts: Vec<&Value> = chunks.iter().flat_map(|c| c["choices"].as_array().unwrap()).collect();
            let streamed = answer(&parts);
            assert_eq!(streamed, expected, "echo {echo}, logprobs {logprobs:?}, max_tokens {max_tokens}");
            if logprobs.is_some() {
                // Offsets run over the whole text: each token's starts where the previous ended.
                let lengths = streamed.tokens.iter().map(|t| t.as_str().unwrap().len() as u64);
                let ends: Vec<u64> = lengths.scan(0, |at, len| Some(std::mem::replace(at, *at + len))).collect();
                let offsets: Vec<u64> = streamed.offsets.iter().map(|o| o.as_u64().unwrap()).collect();
                assert_eq!(offsets, ends, "echo {echo}, max_tokens {max_tokens}");
            }
            if echo && logprobs.is_some() {
                assert_eq!(streamed.logprobs[0], Value::Null, "the first prompt token has no log-probability");
                assert!(streamed.tokens.len() > max_tokens, "the prompt's tokens, then the generated ones");
            }
        }
    }
}

/// A non-streamed request whose client goes away before the answer is counted, with status 499.
#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_request_is_counted_as_499() {
    let server = start().await;
    let series = r#"huginn_requests_total{endpoint="/v1/completions",status="499"}"#;
    let count = |page: &str| metric_value(page, series).unwrap_or(0.0);
    let metrics = || async { reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap() };
    let before = count(&metrics().await);
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_millis(300)).build().unwrap();
    let sent = client
        .post(format!("{}/v1/completions", server.base))
        .json(&common::server::long_completion(false))
        .send()
        .await;
    assert!(sent.is_err(), "the client gives up before the answer");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let page = metrics().await;
        if count(&page) >= before + 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < until, "no 499 counted:\n{page}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
