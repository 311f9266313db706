//! `/metrics` read right after each response shows the request gone (its own test binary: the
//! metrics recorder is process-wide).

mod common;

use common::server::{metric_value, start};
use futures::StreamExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_right_after_each_response_shows_no_running_sequence_or_kv() {
    let server = start().await;
    let client = reqwest::Client::new();
    for i in 0..40 {
        let stream = i % 2 == 1;
        let body = json!({"prompt": "12+34=", "max_tokens": 1 + i % 6, "num_steps": 1 + i % 4, "n": 1 + i % 3,
            "stream": stream, "ignore_eos": true});
        let response = client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        if stream {
            let mut bytes = response.bytes_stream();
            while let Some(chunk) = bytes.next().await {
                chunk.unwrap();
            }
        } else {
            response.bytes().await.unwrap();
        }
        let page = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
        for series in ["huginn_requests_running", "huginn_kv_cache_bytes"] {
            assert_eq!(metric_value(&page, series), Some(0.0), "{series} after response {i} (stream {stream})");
        }
    }
}
