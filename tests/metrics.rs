//! `/metrics` after known requests (its own test binary: the metrics recorder is process-wide).

mod common;

use common::server::{metric_value, start};
use serde_json::json;

fn value(page: &str, series: &str) -> f64 {
    metric_value(page, series).unwrap_or_else(|| panic!("series {series} missing from:\n{page}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_per_token_histogram_counts_every_token() {
    let server = start().await;
    let client = reqwest::Client::new();
    // Two requests of 5 tokens at num_steps 3 (no exit): 10 tokens at 3 steps, exit reason "cap".
    for _ in 0..2 {
        let body = json!({"prompt": "hi", "max_tokens": 5, "num_steps": 3, "ignore_eos": true});
        let response = client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // One with an exit criterion that fires at the first check: 4 tokens; the first comes from the
    // prefill (cap, 6 steps), the next three converge after 1 step each.
    let body = json!({"prompt": "hi", "max_tokens": 4, "num_steps": 6, "exit_criterion": "latent-diff", "exit_threshold": 1e9, "ignore_eos": true});
    let response = client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);

    let page = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
    let name = "huginn_recurrence_steps_per_token";
    assert_eq!(value(&page, &format!("{name}_count{{exit_reason=\"cap\"}}")), 11.0);
    assert_eq!(value(&page, &format!("{name}_sum{{exit_reason=\"cap\"}}")), 36.0);
    assert_eq!(value(&page, &format!("{name}_bucket{{exit_reason=\"cap\",le=\"3\"}}")), 10.0);
    assert_eq!(value(&page, &format!("{name}_count{{exit_reason=\"converged\"}}")), 3.0);
    assert_eq!(value(&page, &format!("{name}_bucket{{exit_reason=\"converged\",le=\"1\"}}")), 3.0);
    assert_eq!(value(&page, "huginn_early_exits_total{criterion=\"latent-diff\"}"), 3.0);
    assert_eq!(value(&page, "huginn_generation_tokens_total"), 14.0);
    // Core steps, per sequence: 2 x (prefill 3 + 4 tokens x 3) + (prefill 6 + 3 x 1).
    assert_eq!(value(&page, "huginn_core_steps_total"), 39.0);
    assert_eq!(value(&page, "huginn_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"), 3.0);
    assert_eq!(value(&page, "huginn_requests_running"), 0.0);
    assert_eq!(value(&page, "huginn_requests_waiting"), 0.0);
    assert_eq!(value(&page, "huginn_kv_cache_bytes"), 0.0);
    assert_eq!(value(&page, "huginn_draft_tokens_total"), 0.0, "exported before any speculation");

    // A speculating request: its drafts and rounds are counted as its usage reports them.
    let body = json!({"prompt": "hi", "max_tokens": 10, "num_steps": 6, "draft_steps": 2, "draft_tokens": 3,
        "init_scale": 0, "ignore_eos": true});
    let response = client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
    let usage = response.json::<serde_json::Value>().await.unwrap()["usage"].clone();
    let page = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
    assert_eq!(value(&page, "huginn_draft_tokens_total"), usage["draft_tokens"].as_f64().unwrap());
    assert_eq!(value(&page, "huginn_draft_tokens_accepted_total"), usage["accepted_draft_tokens"].as_f64().unwrap());
    // 9 tokens after the prefill's, in rounds of 1 to 4.
    let rounds = value(&page, "huginn_speculation_tokens_per_round_count");
    assert_eq!(value(&page, "huginn_speculation_tokens_per_round_sum"), 9.0);
    assert!((3.0..=9.0).contains(&rounds), "{rounds} rounds");

    // A parallel request: one histogram sample per sampler step, summing to its tokens after the
    // prefill's, and to the rows the wavefront held.
    let body = json!({"prompt": "hi", "max_tokens": 10, "num_steps": 6, "sampler": "parallel", "inner_steps": 2,
        "freeze": "fixed", "init_scale": 0, "ignore_eos": true});
    let response = client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
    let usage = response.json::<serde_json::Value>().await.unwrap()["usage"].clone();
    let page = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
    let sampler_steps = usage["sampler_steps"].as_f64().unwrap();
    assert_eq!(value(&page, "huginn_parallel_tokens_per_step_count"), sampler_steps);
    assert_eq!(value(&page, "huginn_parallel_tokens_per_step_sum"), 9.0);
    assert_eq!(value(&page, "huginn_parallel_wavefront_rows_count"), sampler_steps);
    let rows = value(&page, "huginn_parallel_wavefront_rows_sum");
    assert!((usage["mean_wavefront"].as_f64().unwrap() * sampler_steps - rows).abs() < 1e-6, "{usage} {rows}");
    for (metric, _) in huginn::metrics::CATALOG {
        assert!(page.contains(&format!("# HELP {metric}")) || page.contains(metric), "{metric} missing");
    }
}
