//! Prometheus metrics: every name, help text and bucket layout in one place.
//!
//! Names follow Prometheus conventions (prefix `huginn_`, base units, `_total` counters).

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const STEPS_PER_TOKEN: &str = "huginn_recurrence_steps_per_token";
pub const CORE_STEPS: &str = "huginn_core_steps_total";
pub const PROMPT_TOKENS: &str = "huginn_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "huginn_generation_tokens_total";
pub const REQUESTS: &str = "huginn_requests_total";
pub const REQUEST_DURATION: &str = "huginn_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "huginn_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "huginn_inter_token_latency_seconds";
pub const QUEUE_WAIT: &str = "huginn_queue_wait_seconds";
pub const REQUESTS_RUNNING: &str = "huginn_requests_running";
pub const REQUESTS_WAITING: &str = "huginn_requests_waiting";
pub const BATCH_SEQUENCES: &str = "huginn_batch_sequences";
pub const KV_CACHE_BYTES: &str = "huginn_kv_cache_bytes";
pub const EARLY_EXITS: &str = "huginn_early_exits_total";
pub const WORKER_RESTARTS: &str = "huginn_worker_restarts_total";
pub const TICK_ROWS: &str = "huginn_tick_rows";
pub const TICK_DURATION: &str = "huginn_tick_duration_seconds";
pub const PROMPT_ROWS_WAITING: &str = "huginn_prompt_rows_waiting";
pub const DRAFT_TOKENS: &str = "huginn_draft_tokens_total";
pub const DRAFT_TOKENS_ACCEPTED: &str = "huginn_draft_tokens_accepted_total";
pub const TOKENS_PER_ROUND: &str = "huginn_speculation_tokens_per_round";
pub const PARALLEL_TOKENS_PER_STEP: &str = "huginn_parallel_tokens_per_step";
pub const PARALLEL_WAVEFRONT: &str = "huginn_parallel_wavefront_rows";
pub const SEQUENCE_FAULTS: &str = "huginn_sequence_faults_total";
pub const PREFIX_QUERIES: &str = "huginn_prefix_cache_queries_total";
pub const PREFIX_HITS: &str = "huginn_prefix_cache_hits_total";
pub const PREFIX_BYTES: &str = "huginn_prefix_cache_bytes";
pub const PREFIX_EVICTIONS: &str = "huginn_prefix_cache_evictions_total";
pub const DEPTH_FACTOR: &str = "huginn_depth_factor";
pub const ELASTIC_STEPS_SHED: &str = "huginn_elastic_steps_shed_total";

/// (name, help) of every metric, for the README table and the exporter's descriptions.
pub const CATALOG: [(&str, &str); 30] = [
    (
        STEPS_PER_TOKEN,
        "Recurrence (core-block) steps spent per generated token, by exit_reason: converged, cap, budget.",
    ),
    (CORE_STEPS, "Core-block steps computed, counted per sequence (prompt prefill included), by worker."),
    (PROMPT_TOKENS, "Prompt tokens processed."),
    (GENERATION_TOKENS, "Tokens generated."),
    (REQUESTS, "HTTP requests, by endpoint and status code (499: the client closed the connection before the answer)."),
    (
        REQUEST_DURATION,
        "Time from receiving a request until its response starts (the whole answer unless streamed), by endpoint.",
    ),
    (TIME_TO_FIRST_TOKEN, "Time from submission to a choice's first token."),
    (INTER_TOKEN_LATENCY, "Time between consecutive tokens of a choice."),
    (QUEUE_WAIT, "Time a job waited before a worker admitted it."),
    (REQUESTS_RUNNING, "Jobs admitted by a worker and not finished, by worker."),
    (REQUESTS_WAITING, "Jobs accepted and waiting for a worker."),
    (BATCH_SEQUENCES, "Sequences advanced together in one core-step pass."),
    (KV_CACHE_BYTES, "Bytes of key/value cache held by running sequences, by worker."),
    (EARLY_EXITS, "Tokens that stopped iterating because their exit criterion fired, by criterion."),
    (WORKER_RESTARTS, "Model workers restarted after a panic or model error (their in-flight requests failed)."),
    (TICK_ROWS, "Rows (token positions) in one core-step pass: decoding tokens and prompt pieces."),
    (TICK_DURATION, "Time of one scheduler tick (prelude, core-step and coda passes)."),
    (PROMPT_ROWS_WAITING, "Prompt positions not yet through the current prefill stage of their sequence, by worker."),
    (DRAFT_TOKENS, "Tokens drafted by self-speculative decoding and weighed by a verification."),
    (DRAFT_TOKENS_ACCEPTED, "Drafted tokens the verification accepted."),
    (TOKENS_PER_ROUND, "Tokens one speculative round emitted (accepted drafts plus the verifier's own token)."),
    (PARALLEL_TOKENS_PER_STEP, "Tokens the parallel sampler froze in one sampler step."),
    (PARALLEL_WAVEFRONT, "Positions in flight (window rows) in one sampler step of the parallel sampler."),
    (
        SEQUENCE_FAULTS,
        "Sequences that failed on their own (their job got a 500; the worker and its other jobs went on), by worker.",
    ),
    (PREFIX_QUERIES, "Prompt tokens looked up in the prefix cache (every prompt that starts a prefill), by worker."),
    (PREFIX_HITS, "Prompt tokens whose prefill the prefix cache supplied, by worker."),
    (PREFIX_BYTES, "Bytes of prompt K/V blocks the prefix cache holds (part of engine.max_kv_bytes), by worker."),
    (PREFIX_EVICTIONS, "Prefix cache blocks evicted (least recently used, never one in use), by worker."),
    (
        DEPTH_FACTOR,
        "Elastic depth: the factor (0, 1] scaling the recurrence caps of requests with min_num_steps, by worker.",
    ),
    (
        ELASTIC_STEPS_SHED,
        "Elastic depth: steps not spent by tokens that hit a lowered cap (num_steps minus the steps they had).",
    ),
];

fn describe() {
    describe_histogram!(STEPS_PER_TOKEN, Unit::Count, CATALOG[0].1);
    describe_counter!(CORE_STEPS, Unit::Count, CATALOG[1].1);
    describe_counter!(PROMPT_TOKENS, Unit::Count, CATALOG[2].1);
    describe_counter!(GENERATION_TOKENS, Unit::Count, CATALOG[3].1);
    describe_counter!(REQUESTS, Unit::Count, CATALOG[4].1);
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, CATALOG[5].1);
    describe_histogram!(TIME_TO_FIRST_TOKEN, Unit::Seconds, CATALOG[6].1);
    describe_histogram!(INTER_TOKEN_LATENCY, Unit::Seconds, CATALOG[7].1);
    describe_histogram!(QUEUE_WAIT, Unit::Seconds, CATALOG[8].1);
    describe_gauge!(REQUESTS_RUNNING, Unit::Count, CATALOG[9].1);
    describe_gauge!(REQUESTS_WAITING, Unit::Count, CATALOG[10].1);
    describe_histogram!(BATCH_SEQUENCES, Unit::Count, CATALOG[11].1);
    describe_gauge!(KV_CACHE_BYTES, Unit::Bytes, CATALOG[12].1);
    describe_counter!(EARLY_EXITS, Unit::Count, CATALOG[13].1);
    describe_counter!(WORKER_RESTARTS, Unit::Count, CATALOG[14].1);
    describe_histogram!(TICK_ROWS, Unit::Count, CATALOG[15].1);
    describe_histogram!(TICK_DURATION, Unit::Seconds, CATALOG[16].1);
    describe_gauge!(PROMPT_ROWS_WAITING, Unit::Count, CATALOG[17].1);
    describe_counter!(DRAFT_TOKENS, Unit::Count, CATALOG[18].1);
    describe_counter!(DRAFT_TOKENS_ACCEPTED, Unit::Count, CATALOG[19].1);
    describe_histogram!(TOKENS_PER_ROUND, Unit::Count, CATALOG[20].1);
    describe_histogram!(PARALLEL_TOKENS_PER_STEP, Unit::Count, CATALOG[21].1);
    describe_histogram!(PARALLEL_WAVEFRONT, Unit::Count, CATALOG[22].1);
    describe_counter!(SEQUENCE_FAULTS, Unit::Count, CATALOG[23].1);
    describe_counter!(PREFIX_QUERIES, Unit::Count, CATALOG[24].1);
    describe_counter!(PREFIX_HITS, Unit::Count, CATALOG[25].1);
    describe_gauge!(PREFIX_BYTES, Unit::Bytes, CATALOG[26].1);
    describe_counter!(PREFIX_EVICTIONS, Unit::Count, CATALOG[27].1);
    describe_gauge!(DEPTH_FACTOR, Unit::Count, CATALOG[28].1);
    describe_counter!(ELASTIC_STEPS_SHED, Unit::Count, CATALOG[29].1);
}

const STEP_BUCKETS: [f64; 13] = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const ROW_BUCKETS: [f64; 12] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
const FROZEN_BUCKETS: [f64; 11] = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0, 256.0];
const ROUND_BUCKETS: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 17.0];
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs the process-wide recorder once and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(STEPS_PER_TOKEN.into()), &STEP_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SEQUENCES.into()), &BATCH_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(TICK_ROWS.into()), &ROW_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(TOKENS_PER_ROUND.into()), &ROUND_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PARALLEL_TOKENS_PER_STEP.into()), &FROZEN_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PARALLEL_WAVEFRONT.into()), &ROW_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS))
                .expect("static bucket layouts are valid");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding application); the
            // handle then renders an empty page rather than failing the server.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // Series scraped (and autoscaled on) before the first request exist from the start.
            // (The per-worker series start with their workers.)
            metrics::gauge!(REQUESTS_WAITING).set(0.0);
            metrics::counter!(WORKER_RESTARTS).absolute(0);
            metrics::counter!(DRAFT_TOKENS).absolute(0);
            metrics::counter!(DRAFT_TOKENS_ACCEPTED).absolute(0);
            handle
        })
        .clone()
}
