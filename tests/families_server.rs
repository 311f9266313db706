//! The other checkpoint families through the whole server: `huginn serve --model` on each
//! fixture answers completions, chat (with its template) and streams; Ouro's exit gate and
//! `exit_kv`, and what a looped model refuses.

mod common;

use common::repo_root;
use common::server::{data_chunks, settings, steps_of};
use serde_json::{Value, json};

/// The default settings with the `full` cache, under which greedy self-speculation gives exactly
/// plain decoding's output (docs/DESIGN.md, "When outputs equal plain decoding").
fn full_cache() -> huginn::settings::Settings {
    let mut settings = settings();
    settings.generation.kv_cache = huginn::model::CacheStrategy::Full;
    settings
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The streamed text of a completion request.
async fn streamed_text(base: &str, mut body: Value) -> String {
    body["stream"] = json!(true);
    let response = reqwest::Client::new().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    data_chunks(&text)
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()).map(str::to_string))
        .collect()
}

/// Retrofitted-recurrence checkpoints through the whole server.
#[tokio::test(flavor = "multi_thread")]
async fn a_retrofitted_llama_checkpoint_serves_completions_chat_and_streams() {
    // The Llama tokenizer prepends BOS.
    retrofitted_checkpoint_serves("retrofit-llama-tiny-ref", 5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retrofitted_olmo_checkpoint_serves_completions_chat_and_streams() {
    retrofitted_checkpoint_serves("retrofit-olmo-tiny-ref", 4).await;
}

/// Completions (greedy, speculative drafts giving the same text), chat through the checkpoint's
/// template (or the default one), and streaming, on fixture `name`, whose tokenizer makes
/// `prompt_tokens` tokens of "12+34=".
async fn retrofitted_checkpoint_serves(name: &str, prompt_tokens: u64) {
    let server = common::server::start_model(repo_root().join("tests/fixtures").join(name), full_cache()).await;
    let greedy = json!({"prompt": "12+34=", "max_tokens": 8, "temperature": 0, "num_steps": 3, "init_scale": 0,
        "ignore_eos": true});
    let (status, plain) = post(&server.base, "/v1/completions", greedy.clone()).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["usage"]["prompt_tokens"], prompt_tokens, "{name}");
    assert_eq!(plain["usage"]["completion_tokens"], 8);
    assert_eq!(steps_of(&plain["choices"][0]), vec![3; 8]);
    let mut drafting = greedy.clone();
    drafting["draft_steps"] = json!(1);
    drafting["draft_tokens"] = json!(3);
    let (status, drafted) = post(&server.base, "/v1/completions", drafting).await;
    assert_eq!(status, 200, "{drafted}");
    assert_eq!(drafted["choices"][0]["text"], plain["choices"][0]["text"], "greedy speculation is exact");
    assert!(drafted["usage"]["draft_tokens"].as_u64().unwrap() > 0);

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "num_steps": 2});
    let (status, answer) = post(&server.base, "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");

    assert_eq!(streamed_text(&server.base, greedy).await, plain["choices"][0]["text"].as_str().unwrap());
}

/// An Ouro checkpoint through the whole server: completions at per-request loop counts, the exit
/// gate (with `skip`, fewer loops than `num_steps`; with `fill`, all of them and the reference's
/// output), chat through its ChatML template (a turn ends at `<|im_end|>`), streaming, and the
/// 400s of what it cannot run.
#[tokio::test(flavor = "multi_thread")]
async fn an_ouro_checkpoint_serves_with_its_exit_gate() {
    let server = common::server::start_model(repo_root().join("tests/fixtures/ouro-tiny-ref"), full_cache()).await;
    let base = server.base.as_str();
    let greedy = json!({"prompt": "The looped model refines its latent state", "max_tokens": 12,
        "temperature": 0, "ignore_eos": true});
    let (status, plain) = post(base, "/v1/completions", greedy.clone()).await;
    assert_eq!(status, 200, "{plain}");
    // The default loop count is the config's total_ut_steps (4).
    assert_eq!(steps_of(&plain["choices"][0]), vec![4; 12]);
    let mut two = greedy.clone();
    two["num_steps"] = json!(2);
    let (status, shallow) = post(base, "/v1/completions", two).await;
    assert_eq!(status, 200, "{shallow}");
    assert_eq!(steps_of(&shallow["choices"][0]), vec![2; 12]);
    // Self-speculation drafts at fewer loops; greedy, it gives the plain text.
    let mut drafting = greedy.clone();
    drafting["draft_steps"] = json!(1);
    let (status, drafted) = post(base, "/v1/completions", drafting).await;
    assert_eq!(status, 200, "{drafted}");
    assert_eq!(drafted["choices"][0]["text"], plain["choices"][0]["text"], "greedy speculation is exact");
    assert!(drafted["usage"]["draft_tokens"].as_u64().unwrap() > 0);

    let mut skip = greedy.clone();
    skip["exit_criterion"] = json!("gate");
    skip["exit_threshold"] = json!(0.3);
    let (status, gated) = post(base, "/v1/completions", skip.clone()).await;
    assert_eq!(status, 200, "{gated}");
    let steps = steps_of(&gated["choices"][0]);
    assert!(steps.iter().all(|&s| s <= 4) && steps.iter().any(|&s| s < 4), "{steps:?}");
    assert!(
        gated["usage"]["recurrence_steps"].as_u64().unwrap() < plain["usage"]["recurrence_steps"].as_u64().unwrap()
    );
    let mut fill = skip.clone();
    fill["exit_kv"] = json!("fill");
    let (status, filled) = post(base, "/v1/completions", fill).await;
    assert_eq!(status, 200, "{filled}");
    assert_eq!(steps_of(&filled["choices"][0]), vec![4; 12], "fill spends every loop");

    let chat = json!({"messages": [{"role": "user", "content": "What is 905+17?"}], "max_tokens": 6,
        "temperature": 0, "logit_bias": {"2": 100}});
    let (status, answer) = post(base, "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "`<|im_end|>` ends the turn: {answer}");
    // The ChatML prompt of the fixture: 16 tokens.
    assert_eq!(answer["usage"]["prompt_tokens"], 16);

    assert_eq!(streamed_text(base, skip).await, gated["choices"][0]["text"].as_str().unwrap());

    for (body, param) in [
        (json!({"prompt": "x", "continuous_compute": true}), "continuous_compute"),
        (json!({"prompt": "x", "sampler": "parallel"}), "sampler"),
        (json!({"prompt": "x", "exit_kv": "sometimes"}), "exit_kv"),
        (json!({"prompt": "x", "exit_criterion": "gate", "exit_threshold": 1.5}), "exit_threshold"),
    ] {
        let (status, error) = post(base, "/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
    }
}

/// The gate criterion needs a model with a gate.
#[tokio::test(flavor = "multi_thread")]
async fn the_gate_is_refused_on_a_model_without_one() {
    let server =
        common::server::start_model(repo_root().join("tests/fixtures/retrofit-llama-tiny-ref"), settings()).await;
    let body = json!({"prompt": "12+34=", "exit_criterion": "gate"});
    let (status, error) = post(&server.base, "/v1/completions", body).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "exit_criterion");
    assert!(error["error"]["message"].as_str().unwrap().contains("gate"), "{error}");
}
