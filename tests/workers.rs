//! A pool of two CPU workers (`model.devices = ["cpu", "cpu"]`): requests are spread over both,
//! each gets what one worker alone gives it, and one worker's fault leaves the other serving. Its
//! own test binary: the metrics recorder is process-wide.

mod common;

use common::server::{metric_value, post_json, start_with};
use huginn::model::{DeviceList, DeviceSpec};
use serde_json::{Value, json};

fn two_workers() -> huginn::settings::Settings {
    let mut settings = common::server::settings();
    settings.model.devices = DeviceList(vec![DeviceSpec::Cpu, DeviceSpec::Cpu]);
    settings.engine.restart_backoff_ms = 3000;
    settings
}

fn request(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "num_steps": 16, "init_scale": 0, "ignore_eos": true})
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap()
}

fn texts(answers: &[(u16, Value)]) -> Vec<String> {
    answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_spread_over_both_workers_and_a_fault_leaves_the_other_serving() {
    let pool = start_with(two_workers()).await;
    let single = start_with(common::server::settings()).await;
    assert_eq!(pool.state.engine.workers(), 2);
    assert_eq!(single.state.engine.workers(), 1);
    let prompts = ["12+34=", "hello", "The recurrent block", "7+8="];

    // Concurrent requests run on both workers and get the same text as on one worker.
    let send = |base: String| async move {
        let tasks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (base, body) = (base.clone(), request(p, 24));
                tokio::spawn(async move { post_json(&base, "/v1/completions", &body).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    };
    let pooled = texts(&send(pool.base.clone()).await);
    // (Read before the single worker runs: the recorder is shared, and its worker is "0" too.)
    let page = metrics(&pool.base).await;
    let alone = texts(&send(single.base.clone()).await);
    assert_eq!(pooled, alone);
    for worker in ["0", "1"] {
        let steps = metric_value(&page, &format!("huginn_core_steps_total{{worker=\"{worker}\"}}")).unwrap_or(0.0);
        assert!(steps > 0.0, "worker {worker} computed no core step:\n{page}");
        let running = metric_value(&page, &format!("huginn_requests_running{{worker=\"{worker}\"}}"));
        assert_eq!(running, Some(0.0), "worker {worker}");
    }

    // Two long requests: one lands on each worker. A fault on worker 0 fails only its request.
    let engine = pool.state.engine.clone();
    let long =
        |base: String| tokio::spawn(async move { post_json(&base, "/v1/completions", &request("hello", 150)).await });
    let (first, second) = (long(pool.base.clone()), long(pool.base.clone()));
    assert!(
        common::server::eventually(10, || engine.worker_loads().iter().all(|(sequences, _)| *sequences == 1)).await,
        "the two requests should run on different workers: {:?}",
        engine.worker_loads()
    );
    assert!(engine.inject_fault(0));
    assert!(common::server::eventually(10, || engine.restarts() == 1).await, "the fault did not happen");
    // While worker 0 restarts the pool is not ready.
    assert!(!engine.ready());
    let answers = [first.await.unwrap(), second.await.unwrap()];
    let failed: Vec<&(u16, Value)> = answers.iter().filter(|(status, _)| *status == 500).collect();
    assert_eq!(failed.len(), 1, "{answers:?}");
    // The fault's details stay in the server's log; the client gets its request id.
    assert_eq!(failed[0].1["error"]["code"], "internal_error", "{:?}", failed[0]);
    assert!(!failed[0].1["error"]["message"].as_str().unwrap().contains("injected fault"));
    let served = answers.iter().find(|(status, _)| *status == 200).expect("the other worker's request completes");
    assert_eq!(served.1["usage"]["completion_tokens"], 150);

    // Worker 1 keeps serving.
    let (status, body) = post_json(&pool.base, "/v1/completions", &request("7+8=", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert!(common::server::eventually(20, || engine.ready()).await, "worker 0 did not come back");
    assert_eq!(engine.restarts(), 1);
}
