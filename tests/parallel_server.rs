//! The parallel sampler over HTTP: its fields, their 400s, what a response reports of it, and
//! streaming (tokens frozen together arrive as one chunk, each with its steps).

mod common;

use common::server::{data_chunks, post_json, start, steps_of};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn parallel_requests_report_their_sampler_steps_and_stream_what_freezes() {
    let server = start().await;
    let base = &server.base;
    let plain = json!({"prompt": "The recurrent block", "max_tokens": 12, "num_steps": 8, "init_scale": 0,
        "ignore_eos": true});
    let (_, reference) = post_json(base, "/v1/completions", &plain).await;
    assert!(reference["usage"].get("sampler_steps").is_none(), "sequential: no sampler steps");

    // inner_steps = num_steps with the fixed rule is ordinary decoding.
    let mut same = plain.clone();
    (same["sampler"], same["inner_steps"], same["freeze"]) = (json!("parallel"), json!(8), json!("fixed"));
    let (status, body) = post_json(base, "/v1/completions", &same).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], reference["choices"][0]["text"]);
    assert_eq!(body["choices"][0]["parallel"]["tokens_per_step"], json!(1.0));

    let mut parallel = plain.clone();
    (parallel["sampler"], parallel["inner_steps"], parallel["exit_threshold"]) =
        (json!("parallel"), json!(2), json!(0.05));
    let (status, body) = post_json(base, "/v1/completions", &parallel).await;
    assert_eq!(status, 200, "{body}");
    let (choice, usage) = (&body["choices"][0], &body["usage"]);
    let sampler_steps = usage["sampler_steps"].as_u64().unwrap();
    assert!(sampler_steps >= 11, "{usage}");
    assert_eq!(choice["parallel"]["sampler_steps"].as_u64(), Some(sampler_steps));
    let per_step = usage["tokens_per_sampler_step"].as_f64().unwrap();
    assert!((per_step - 11.0 / sampler_steps as f64).abs() < 1e-9, "{usage}");
    assert!(usage["mean_wavefront"].as_f64().unwrap() >= 1.0);
    assert_eq!(usage["recurrence_steps"].as_u64(), Some(steps_of(choice).iter().sum()));

    // Streamed: the same text and steps; each chunk carries the steps of each of its tokens.
    parallel["stream"] = json!(true);
    let text = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&parallel)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = data_chunks(&text);
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, choice["text"].as_str().unwrap());
    let steps: Vec<u64> = chunks.iter().flat_map(|c| steps_of(&c["choices"][0])).collect();
    assert_eq!(steps, steps_of(choice));
    let last = &chunks.last().unwrap()["choices"][0];
    assert_eq!(last["parallel"]["sampler_steps"].as_u64(), Some(sampler_steps), "{last}");

    // Tokens emitted by one step travel together: a speculative round's accepted drafts.
    let mut speculative = plain.clone();
    (speculative["draft_steps"], speculative["draft_tokens"], speculative["stream"]) =
        (json!(2), json!(4), json!(true));
    let text = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&speculative)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = data_chunks(&text);
    let sizes: Vec<usize> = chunks.iter().map(|c| steps_of(&c["choices"][0]).len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 12);
    assert!(sizes.iter().any(|&n| n > 1), "some round's tokens share a chunk: {sizes:?}");
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, reference["choices"][0]["text"].as_str().unwrap());
}

/// The JSON of each `data:` event but `[DONE]`.
#[tokio::test(flavor = "multi_thread")]
async fn bad_parallel_fields_are_400s_naming_them() {
    let server = start().await;
    let parallel = |extra: Value| {
        let mut body = json!({"prompt": "x", "num_steps": 8, "sampler": "parallel"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (body, param) in [
        (json!({"prompt": "x", "sampler": "diffusion"}), "sampler"),
        (json!({"prompt": "x", "inner_steps": 2}), "inner_steps"),
        (json!({"prompt": "x", "sampler": "sequential", "embed_ema": 0.2}), "embed_ema"),
        (parallel(json!({"inner_steps": 0})), "inner_steps"),
        (parallel(json!({"inner_steps": 9})), "inner_steps"),
        (parallel(json!({"inner_steps": "four"})), "inner_steps"),
        (parallel(json!({"freeze": "soon"})), "freeze"),
        (parallel(json!({"max_wavefront": 0})), "max_wavefront"),
        (parallel(json!({"max_wavefront": 257})), "max_wavefront"),
        (parallel(json!({"state_noise": 1.5})), "state_noise"),
        (parallel(json!({"embed_ema": 1.0})), "embed_ema"),
        (parallel(json!({"exit_threshold": -1})), "exit_threshold"),
        (parallel(json!({"freeze": "fixed", "exit_threshold": 0.1})), "exit_threshold"),
        (parallel(json!({"exit_criterion": "kl"})), "exit_criterion"),
        (parallel(json!({"draft_steps": 2})), "sampler"),
        (parallel(json!({"continuous_compute": true})), "sampler"),
    ] {
        let (status, response) = post_json(&server.base, "/v1/completions", &body).await;
        assert_eq!(status, 400, "{body}: {response}");
        assert_eq!(response["error"]["param"].as_str(), Some(param), "{body}: {response}");
        assert!(response["error"]["message"].as_str().is_some_and(|m| m.contains(param)), "{response}");
    }
    // The chat endpoint resolves the same fields.
    let chat = json!({"messages": [{"role": "user", "content": "x"}], "sampler": "parallel", "max_wavefront": 0});
    let (status, response) = post_json(&server.base, "/v1/chat/completions", &chat).await;
    assert_eq!((status, response["error"]["param"].as_str()), (400, Some("max_wavefront")), "{response}");
    let chat = json!({"messages": [{"role": "user", "content": "x"}], "sampler": "parallel", "max_tokens": 4});
    let (status, response) = post_json(&server.base, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{response}");
    assert!(response["choices"][0]["parallel"]["sampler_steps"].is_u64(), "{response}");
}
