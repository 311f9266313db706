//! A bounded soak: 400 mixed requests at concurrency 32 (plain and streamed, completions and chat,
//! different budgets, cancellations, bad requests). Every valid request is answered or cleanly
//! rejected with 429, none gets a 5xx, and the gauges return to zero. Its own test binary, so the
//! process-wide metrics see no other test. `cargo test --release --test soak -- --nocapture`
//! prints the figures quoted in docs/RELIABILITY.md.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::server::{metric_value, start_with};
use serde_json::{Value, json};

const REQUESTS: usize = 400;
const CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Answered,
    Rejected429,
    /// The client went away on purpose.
    Cancelled,
    /// A bad request answered with its 4xx.
    BadRequestRefused,
}

/// What request `i` is: its path, body, whether it streams, and how the client behaves.
fn request(i: usize) -> (&'static str, Value, Behaviour) {
    let steps = [1, 4, 8, 16][i % 4];
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": format!("question {i}")}], "max_tokens": 6});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    match i % 10 {
        0 | 1 => (
            "/v1/completions",
            json!({"prompt": format!("{i}+1="), "max_tokens": 8, "num_steps": steps}),
            Behaviour::Read,
        ),
        2 => (
            "/v1/completions",
            json!({"prompt": "count", "max_tokens": 8, "stream": true, "stream_options": {"include_usage": true},
                   "exit_criterion": "kl", "num_steps": 16}),
            Behaviour::Read,
        ),
        3 => ("/v1/chat/completions", chat(json!({"n": 2, "num_steps": steps})), Behaviour::Read),
        4 => ("/v1/chat/completions", chat(json!({"stream": true, "temperature": 0.8, "seed": i})), Behaviour::Read),
        5 => (
            "/v1/completions",
            json!({"prompt": "long", "max_tokens": 200, "num_steps": 64, "ignore_eos": true, "stream": true}),
            Behaviour::DropAfterFirstChunk,
        ),
        6 => ("/v1/completions", json!({"prompt": "x", "temperature": 9}), Behaviour::ExpectRefusal),
        7 => (
            "/v1/completions",
            json!({"prompt": "long", "max_tokens": 200, "num_steps": 64, "ignore_eos": true}),
            Behaviour::GiveUpAfter(Duration::from_millis(30)),
        ),
        8 => (
            "/v1/completions",
            json!({"prompt": "score me", "max_tokens": 0, "echo": true, "logprobs": 2}),
            Behaviour::Read,
        ),
        _ => (
            "/v1/completions",
            json!({"prompt": "more", "max_tokens": 16, "num_steps": 32, "stream": true}),
            Behaviour::Read,
        ),
    }
}

#[derive(Clone, Copy)]
enum Behaviour {
    Read,
    DropAfterFirstChunk,
    GiveUpAfter(Duration),
    ExpectRefusal,
}

/// Retries after a 429 as a client honouring Retry-After would (sooner, to keep the test short).
const ATTEMPTS: usize = 20;

async fn run_with_retries(
    client: &reqwest::Client,
    base: &str,
    i: usize,
    rejections: &AtomicUsize,
) -> Result<Outcome, String> {
    for attempt in 1..=ATTEMPTS {
        match run_one(client, base, i).await? {
            Outcome::Rejected429 if attempt < ATTEMPTS => {
                rejections.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10 * attempt as u64)).await;
            }
            outcome => return Ok(outcome),
        }
    }
    unreachable!()
}

async fn run_one(client: &reqwest::Client, base: &str, i: usize) -> Result<Outcome, String> {
    let (path, body, behaviour) = request(i);
    let streamed = body["stream"] == true;
    let send = client.post(format!("{base}{path}")).json(&body).send();
    let response = match behaviour {
        Behaviour::GiveUpAfter(after) => match tokio::time::timeout(after, send).await {
            Err(_) => return Ok(Outcome::Cancelled),
            Ok(response) => response,
        },
        _ => send.await,
    }
    .map_err(|e| format!("request {i}: {e}"))?;
    let status = response.status().as_u16();
    if status == 429 {
        let retry = response.headers().get("retry-after").is_some();
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        return if retry && body["error"]["code"] == "queue_full" {
            Ok(Outcome::Rejected429)
        } else {
            Err(format!("request {i}: a 429 without Retry-After or code: {body}"))
        };
    }
    if let Behaviour::ExpectRefusal = behaviour {
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        return if (400..500).contains(&status) && body["error"]["param"] == "temperature" {
            Ok(Outcome::BadRequestRefused)
        } else {
            Err(format!("request {i}: expected a 400 naming temperature, got {status} {body}"))
        };
    }
    if status != 200 {
        return Err(format!("request {i} ({path}): status {status}: {}", response.text().await.unwrap_or_default()));
    }
    if let Behaviour::DropAfterFirstChunk = behaviour {
        let mut response = response;
        let _ = response.chunk().await;
        return Ok(Outcome::Cancelled);
    }
    let text = response.text().await.map_err(|e| format!("request {i}: {e}"))?;
    if streamed {
        if !text.trim_end().ends_with("data: [DONE]") || text.contains("\"error\"") {
            return Err(format!("request {i}: a broken stream: {text}"));
        }
    } else {
        let body: Value = serde_json::from_str(&text).map_err(|e| format!("request {i}: {e}: {text}"))?;
        if body["choices"].as_array().is_none_or(|c| c.is_empty()) {
            return Err(format!("request {i}: no choices: {body}"));
        }
    }
    Ok(Outcome::Answered)
}

/// Peak resident memory of this process (server and clients), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn four_hundred_mixed_requests_at_concurrency_32() {
    let mut settings = common::server::settings();
    settings.engine.queue_capacity = 8;
    settings.engine.max_active_sequences = 16;
    let server = start_with(settings).await;
    let base = Arc::new(server.base.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let rejections = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (base, next, rejections) = (base.clone(), next.clone(), rejections.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut outcomes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        return outcomes;
                    }
                    outcomes.push(run_with_retries(&client, &base, i, &rejections).await);
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.unwrap());
    }
    let elapsed = started.elapsed();
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), failures.first());
    let count = |kind: Outcome| outcomes.iter().filter(|o| o.as_ref().ok() == Some(&kind)).count();
    let (answered, rejected, cancelled, refused) = (
        count(Outcome::Answered),
        count(Outcome::Rejected429),
        count(Outcome::Cancelled),
        count(Outcome::BadRequestRefused),
    );
    assert_eq!(answered + rejected + cancelled + refused, REQUESTS);
    assert_eq!(refused, REQUESTS / 10, "every bad request gets its 400");
    assert!(answered >= REQUESTS / 4, "most valid requests should be served: {answered}");

    // Every sequence and byte of cache is released: the gauges and the engine agree on zero.
    let engine = server.state.engine.clone();
    let metrics_url = format!("{base}/metrics");
    let mut metrics = String::new();
    let mut idle = false;
    for _ in 0..400 {
        metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
        idle = ["huginn_requests_running", "huginn_requests_waiting", "huginn_kv_cache_bytes"]
            .iter()
            .all(|name| metric_value(&metrics, name) == Some(0.0))
            && engine.in_flight() == 0
            && engine.kv_bytes() == 0;
        if idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle, "the gauges did not return to zero:\n{metrics}");
    let server_errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("huginn_requests_total{") && l.contains("status=\"5"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(server_errors, 0.0, "no 5xx in the server's own count:\n{metrics}");
    assert_eq!(engine.restarts(), 0);
    println!(
        "soak: {REQUESTS} requests at concurrency {CONCURRENCY} in {:.1} s: {answered} answered, {rejected} given up \
         after {ATTEMPTS} 429s, {} 429 answers retried, {cancelled} cancelled by their clients, {refused} bad \
         requests refused with 400, 0 server errors; peak RSS {:.0} MiB",
        elapsed.as_secs_f64(),
        rejections.load(Ordering::Relaxed),
        peak_rss_mib()
    );
}
