//! Prefix caching as clients see it: `usage.prompt_tokens_details.cached_tokens`, the same echo
//! log-probabilities and text on a hit as on a cold cache, the cache's metrics, and
//! `engine.prefix_cache_bytes = 0` turning it off (its own test binary: the metrics recorder is
//! process-wide).

mod common;

use common::server::{data_chunks, post_json, settings, start_with};
use serde_json::{Value, json};

/// The sum of every series of `name` (one per worker) on a `/metrics` page.
fn total(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap()
}

/// A loglikelihood request as lm-evaluation-harness sends it: the prompt echoed with its
/// log-probabilities, nothing generated.
fn scoring(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1, "num_steps": 3, "seed": seed})
}

/// The tokens a prompt of `tokens` finds when its complete blocks are cached.
fn hit(tokens: u64) -> u64 {
    (tokens / 16 * 16).min(tokens - 1)
}

const CONTEXT: &str = "Question: which planet is the largest? Answer:";

#[tokio::test(flavor = "multi_thread")]
async fn a_hit_is_reported_counted_and_answers_as_a_cold_prefill() {
    let server = start_with(settings()).await;
    let base = &server.base;
    // 46 bytes of context: two blocks of 16 shared by prompts that start with it.
    let prompts = [format!("{CONTEXT} Jupiter"), format!("{CONTEXT} Mars"), format!("{CONTEXT} Jupiter")];
    let mut answers = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let (status, body) = post_json(base, "/v1/completions", &scoring(prompt, i as u64)).await;
        assert_eq!(status, 200, "{body}");
        answers.push(body);
    }
    let cached: Vec<u64> =
        answers.iter().map(|a| a["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()).collect();
    // The second shares two blocks with the first; the third is the first again: all its complete
    // blocks, all but its last token at most.
    let tokens = answers[2]["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(cached, [0, 32, hit(tokens)]);
    let logprobs = |a: &Value| a["choices"][0]["logprobs"]["token_logprobs"].clone();
    assert_eq!(logprobs(&answers[2]), logprobs(&answers[0]), "a hit changed the echo log-probabilities");

    let page = metrics(base).await;
    let queried: u64 = answers.iter().map(|a| a["usage"]["prompt_tokens"].as_u64().unwrap()).sum();
    assert_eq!(total(&page, "huginn_prefix_cache_queries_total"), queried as f64);
    assert_eq!(total(&page, "huginn_prefix_cache_hits_total"), cached.iter().sum::<u64>() as f64);
    assert!(total(&page, "huginn_prefix_cache_bytes") > 0.0, "{page}");
    assert_eq!(total(&page, "huginn_prefix_cache_evictions_total"), 0.0);

    // The choices of one request share its prefill; streamed usage reports it too.
    let body = json!({"prompt": prompts[1], "max_tokens": 2, "n": 3, "num_steps": 3, "stream": true,
        "stream_options": {"include_usage": true}, "seed": 4});
    let text = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage = data_chunks(&text).into_iter().rev().find(|c| c["usage"].is_object()).unwrap()["usage"].clone();
    let tokens = answers[1]["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], json!(3 * hit(tokens)), "{usage}");
    assert_eq!(usage["prompt_tokens"], json!(3 * tokens), "{usage}");

    // Chat: the template's beginning is shared by every conversation.
    let chat = |content: &str| json!({"messages": [{"role": "system", "content": CONTEXT}, {"role": "user", "content": content}], "max_tokens": 1, "num_steps": 2});
    post_json(base, "/v1/chat/completions", &chat("a")).await;
    let (status, body) = post_json(base, "/v1/chat/completions", &chat("b")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 32, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_of_zero_turns_the_cache_off() {
    let mut off = settings();
    off.engine.prefix_cache_bytes = 0;
    let server = start_with(off).await;
    for seed in 0..2 {
        let (status, body) = post_json(&server.base, "/v1/completions", &scoring(CONTEXT, seed)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], json!(0), "{body}");
    }
}
