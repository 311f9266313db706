//! The `huginn` binary end to end: `generate` on the fixture, `init-random`, argument errors.

mod common;

use std::process::{Command, Output};

use common::fixture_dir;
use serde_json::Value;

fn huginn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_huginn")).args(args).output().expect("run huginn")
}

fn json_out(out: &Output) -> Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn fixture_ids(strategy: &str, steps: u64) -> Vec<u64> {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap()).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["kind"] == "greedy_decode"
                && c["cache_strategy"] == strategy
                && c["num_steps"] == steps
                && c["prompt"] == "The recurrent block iterates"
        })
        .unwrap();
    case["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

#[test]
fn greedy_generate_reproduces_the_reference_for_both_caches() {
    let model = fixture_dir();
    for (kv, fixture_strategy) in [("shared:1", "compress-s2"), ("full", "full")] {
        let out = huginn(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The recurrent block iterates",
            "--num-steps",
            "8",
            "--init-scale",
            "0",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--kv-cache",
            kv,
            "--format",
            "json",
        ]);
        let body = json_out(&out);
        let ids: Vec<u64> = body["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ids, fixture_ids(fixture_strategy, 8), "--kv-cache {kv}");
        assert_eq!(body["steps_per_token"], serde_json::json!([8, 8, 8, 8, 8, 8, 8, 8]));
        assert_eq!(body["finish_reason"], "length");
        assert!(body["timing"]["decode_seconds"].as_f64().unwrap() > 0.0);
        assert!(body["kv_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn text_format_streams_the_same_text_as_json() {
    let model = fixture_dir();
    let common = [
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "313,14,316,32",
        "--num-steps",
        "4",
        "--init-scale",
        "0",
        "--max-tokens",
        "10",
        "--ignore-eos",
    ];
    let json = json_out(&huginn(&[&["generate"], &common[..], &["--format", "json"]].concat()));
    let text = huginn(&[&["generate"], &common[..], &["--format", "text"]].concat());
    assert!(text.status.success());
    assert_eq!(String::from_utf8_lossy(&text.stdout).trim_end_matches('\n'), json["text"].as_str().unwrap());
    let stats = String::from_utf8_lossy(&text.stderr);
    assert!(stats.contains("10 tokens") && stats.contains("steps/token"), "{stats}");
}

#[test]
fn adaptive_exit_reports_fewer_steps_than_the_cap() {
    let model = fixture_dir();
    let body = json_out(&huginn(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "12+34=",
        "--num-steps",
        "32",
        "--exit-criterion",
        "kl",
        "--exit-threshold",
        "5e-4",
        "--init-scale",
        "0",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--format",
        "json",
    ]));
    let steps: Vec<u64> = body["steps_per_token"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    // Reference (adaptive.json, kl 5e-4 on "12+34="): 14, 8, 9, 19, 15 steps after the 32-step prefill.
    assert_eq!(steps, vec![32, 14, 8, 9, 19, 15]);
}

#[test]
fn init_random_writes_a_checkpoint_generate_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let made = huginn(&[
        "init-random",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "3",
        "--n-embd",
        "32",
        "--heads",
        "2",
        "--intermediate-size",
        "48",
        "--vocab-size",
        "320",
        "--dtype",
        "bf16",
        "--shards",
        "2",
    ]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["n_embd"].as_u64(), cfg["vocab_size"].as_u64(), cfg["torch_dtype"].as_str()),
        (Some(32), Some(320), Some("bfloat16"))
    );
    let body = json_out(&huginn(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--dtype",
        "bf16",
        "--format",
        "json",
        "--chat",
    ]));
    assert_eq!(body["token_ids"].as_array().unwrap().len(), 5);
    let prompt: Vec<u64> = body["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(prompt[0], 288, "the chat template starts with <|begin_text|>");
}

/// An Ouro preset (shrunk by the shape flags) is written in Ouro's format and generates with its
/// exit gate: with `--exit-kv fill` every token spends every loop.
#[test]
fn an_ouro_preset_generates_with_its_gate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ouro");
    let o = out.to_str().unwrap();
    let shape = ["--n-embd", "32", "--heads", "2", "--intermediate-size", "48", "--vocab-size", "320"];
    let mut args =
        vec!["init-random", "--out", o, "--preset", "ouro-1.4b", "--core-layers", "2", "--block-size", "128"];
    args.extend(shape);
    let made = huginn(&args);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "OuroForCausalLM");
    assert_eq!((cfg["hidden_size"].as_u64(), cfg["total_ut_steps"].as_u64()), (Some(32), Some(4)));
    let generate =
        ["generate", "--model", o, "--prompt", "hello", "--max-tokens", "4", "--ignore-eos", "--format", "json"];
    let mut gated = generate.to_vec();
    gated.extend(["--exit-criterion", "gate", "--exit-threshold", "0.3", "--exit-kv", "fill"]);
    let body = json_out(&huginn(&gated));
    let steps: Vec<u64> = body["steps_per_token"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4; 4]);
    let mut refused = generate.to_vec();
    refused.push("--continuous-compute");
    let out = huginn(&refused);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("continuous_compute"));
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let model = fixture_dir();
    let m = model.to_str().unwrap();
    for (args, needle) in [
        (vec!["generate", "--model", m, "--prompt", "x", "--kv-cache", "ring"], "kv cache strategy `ring`"),
        (vec!["generate", "--model", m, "--prompt", "x", "--exit-criterion", "soon"], "unknown exit criterion `soon`"),
        (vec!["generate", "--model", m, "--prompt", "x", "--exit-kv", "sometimes"], "unknown exit_kv `sometimes`"),
        (vec!["generate", "--model", m, "--prompt", "x", "--exit-criterion", "gate"], "learned exit gate"),
        (vec!["generate", "--model", m, "--prompt", "x", "--top-p", "0"], "`top_p` must be in (0, 1]"),
        // The server's ranges and limits, from the same resolution.
        (
            vec!["generate", "--model", m, "--prompt", "x", "--temperature", "2.5"],
            "`temperature` must be between 0 and 2",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "x", "--num-steps", "257"],
            "`num_steps` must be between 1 and 256",
        ),
        (vec!["generate", "--model", m, "--prompt", "x", "--num-steps", "4", "--min-steps", "5"], "`min_steps`"),
        (
            vec!["generate", "--model", m, "--prompt", "x", "--dtype", "int8"],
            "dtype `int8`: use auto, f32, bf16 or f16",
        ),
        (vec!["generate", "--model", m, "--prompt", "x", "--backend", "gpu"], "backend `gpu`: use `auto` or `tensor`"),
        (vec!["generate", "--model", m, "--prompt", "x", "--device", "tpu"], "device `tpu`"),
        (vec!["generate", "--model", "/nonexistent", "--prompt", "x"], "config.json: file not found"),
        (vec!["generate", "--model", m], "--prompt"),
        (vec!["train", "--out", "/nonexistent/x", "--digits", "19"], "--digits must be 1 to 18"),
        (vec!["train", "--out", "/nonexistent/x", "--digits", "4", "--start-digits", "5"], "--start-digits must be 1"),
        (vec!["train", "--out", "/nonexistent/x", "--steps", "10", "--curriculum-steps", "11"], "--curriculum-steps"),
        (
            vec!["train", "--out", "/nonexistent/x", "--init-from", "/nonexistent/y"],
            "--init-from /nonexistent/y: no model.safetensors",
        ),
        (vec!["eval", "--model", m, "--digits", "19"], "--digits"),
        (vec!["eval", "--model", m, "--draft", "2:4"], "use draft_steps:draft_tokens:num_steps"),
        (
            vec!["eval", "--model", m, "--draft", "8:4:8"],
            "`draft_steps` must be between 1 and num_steps - 1 (7), got 8",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "x", "--num-steps", "4", "--draft-steps", "4"],
            "`draft_steps` must be 0 (no speculation) or between 1 and num_steps - 1 (3)",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "x", "--draft-steps", "1", "--draft-tokens", "99"],
            "`draft_tokens`",
        ),
    ] {
        let out = huginn(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bad_settings_stop_serve_at_once_naming_the_key() {
    for (var, value) in [
        ("HUGINN_GENERATION_KV_CACHE", "bogus"),
        ("HUGINN_GENERATION_EXIT_CRITERION", "soon"),
        ("HUGINN_GENERATION_TEMPERATURE", "9"),
        ("HUGINN_MODEL_DTYPE", "int8"),
        ("HUGINN_MODEL_DEVICE", "tpu"),
        ("HUGINN_ENGINE_MAX_TICK_ROWS", "8"),
        ("HUGINN_GENERATION_SAMPLER", "bogus"),
        ("HUGINN_GENERATION_FREEZE", "soon"),
        ("HUGINN_GENERATION_INNER_STEPS", "0"),
        ("HUGINN_GENERATION_STATE_NOISE", "2"),
        ("HUGINN_GENERATION_EMBED_EMA", "1"),
        ("HUGINN_GENERATION_MAX_WAVEFRONT", "0"),
        ("HUGINN_LIMITS_MAX_WAVEFRONT", "0"),
        // Values that used to start and then refuse every request, or be clamped silently; the
        // first two checked against the default model (8 steps per token).
        ("HUGINN_GENERATION_DRAFT_STEPS", "8"),
        ("HUGINN_GENERATION_MIN_STEPS", "100"),
        ("HUGINN_LIMITS_MAX_N", "0"),
        ("HUGINN_LIMITS_MAX_TOKENS", "0"),
        ("HUGINN_LIMITS_MAX_PROMPT_TOKENS", "0"),
        ("HUGINN_LIMITS_MAX_NUM_STEPS", "0"),
        ("HUGINN_LIMITS_MAX_NUM_STEPS", "4"),
        ("HUGINN_GENERATION_NUM_STEPS", "1000"),
        ("HUGINN_GENERATION_MAX_TOKENS", "5000"),
        ("HUGINN_ENGINE_QUEUE_CAPACITY", "0"),
        ("HUGINN_SERVER_MAX_CONCURRENT_REQUESTS", "0"),
        ("HUGINN_ENGINE_MAX_ACTIVE_SEQUENCES", "0"),
    ] {
        let started = std::time::Instant::now();
        // Port 0: were the settings accepted, the server would start and this test would hang.
        let out = Command::new(env!("CARGO_BIN_EXE_huginn"))
            .args(["serve", "--port", "0"])
            .env(var, value)
            .output()
            .expect("run huginn");
        assert!(!out.status.success(), "{var}={value} should stop start-up");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{var}={value}: {err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "{var}: exits at once");
    }
    // In a settings file, the message names the key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    std::fs::write(&file, "[generation]\ntop_p = 0\n").unwrap();
    let out = huginn(&["--settings", file.to_str().unwrap(), "serve", "--port", "0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("generation.top_p"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn settings_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    let model = fixture_dir();
    std::fs::write(
        &file,
        format!("[model]\npath = {:?}\n[generation]\nnum_steps = 3\nmax_tokens = 4\ninit_scale = 0.0\n", model),
    )
    .unwrap();
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_huginn"));
        cmd.args([
            "--settings",
            file.to_str().unwrap(),
            "generate",
            "--prompt",
            "hi",
            "--ignore-eos",
            "--format",
            "json",
        ]);
        cmd.args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        json_out(&cmd.output().unwrap())["steps_per_token"].clone()
    };
    assert_eq!(run(&[], &[]), serde_json::json!([3, 3, 3, 3]));
    assert_eq!(run(&[("HUGINN_GENERATION_NUM_STEPS", "2")], &[]), serde_json::json!([2, 2, 2, 2]));
    assert_eq!(run(&[("HUGINN_GENERATION_NUM_STEPS", "2")], &["--num-steps", "5"]), serde_json::json!([5, 5, 5, 5]));
    std::fs::write(&file, "[generation]\nnumsteps = 3\n").unwrap();
    let out = huginn(&["--settings", file.to_str().unwrap(), "generate", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("numsteps"));
}

#[test]
fn train_writes_a_servable_checkpoint_and_eval_reports_a_table_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let config = dir.path().join("shape.json");
    // A very small shape so that the run takes a moment.
    let mut shape: Value = serde_json::to_value(huginn::checkpoint::preset("addition").unwrap()).unwrap();
    shape["n_embd"] = 32.into();
    shape["num_attention_heads"] = 2.into();
    shape["num_key_value_heads"] = 2.into();
    shape["intermediate_size"] = 64.into();
    std::fs::write(&config, shape.to_string()).unwrap();
    let trained = huginn(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--mean-recurrence",
        "2",
        "--checkpoint-every",
        "2",
        "--digits",
        "2",
    ]);
    assert!(trained.status.success(), "stderr: {}", String::from_utf8_lossy(&trained.stderr));
    let task: Value = serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(task, serde_json::json!({"task": "addition", "digits": 2}));
    for file in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    let run: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(run["step"], 3);
    assert_eq!(run["options"]["model"]["mean_recurrence"], 2);

    let (table, plot, steps_plot) =
        (dir.path().join("eval.md"), dir.path().join("plot.svg"), dir.path().join("steps.svg"));
    let eval = huginn(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--problems",
        "5",
        "--num-steps",
        "1,2",
        "--exit",
        "kl:0.001:4",
        "--markdown",
        table.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--steps-plot",
        steps_plot.to_str().unwrap(),
    ]);
    assert!(eval.status.success(), "stderr: {}", String::from_utf8_lossy(&eval.stderr));
    // The operands' digits come from the model's task.json.
    assert!(String::from_utf8_lossy(&eval.stderr).contains("(2-digit operands"));
    let table = std::fs::read_to_string(table).unwrap();
    // The results, then the mean steps per answer position of the adaptive setting.
    assert_eq!(table.lines().count(), 2 + 3 + 1 + 2 + 1, "{table}");
    assert!(table.contains("| fixed 2 | 2 |") && table.contains("| exit kl:0.001:4 | 4 |"), "{table}");
    assert!(table.contains("| mean steps per answer position |") && table.contains(" end |"), "{table}");
    assert!(std::fs::read_to_string(plot).unwrap().starts_with("<svg"));
    assert!(std::fs::read_to_string(steps_plot).unwrap().contains("answer digit"));
    let no_exit = huginn(&["eval", "--model", out.to_str().unwrap(), "--problems", "1", "--steps-plot", "x.svg"]);
    assert!(!no_exit.status.success());
    assert!(String::from_utf8_lossy(&no_exit.stderr).contains("--steps-plot needs"));

    let bad = huginn(&["eval", "--model", out.to_str().unwrap(), "--exit", "kl"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("criterion:threshold:cap"));
}

/// Variables that only make sense together are checked together, whatever their order.
#[test]
fn related_variables_are_checked_after_every_source_is_merged() {
    let pairs = [
        [("HUGINN_GENERATION_DRAFT_TOKENS", "20"), ("HUGINN_LIMITS_MAX_DRAFT_TOKENS", "32")],
        [("HUGINN_GENERATION_MAX_WAVEFRONT", "300"), ("HUGINN_LIMITS_MAX_WAVEFRONT", "512")],
        [("HUGINN_ENGINE_MAX_TICK_ROWS", "16"), ("HUGINN_ENGINE_MAX_ACTIVE_SEQUENCES", "8")],
    ];
    let model = fixture_dir();
    for pair in pairs {
        for order in [[0, 1], [1, 0]] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_huginn"));
            cmd.args(["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--max-tokens", "1"]);
            for i in order {
                cmd.env(pair[i].0, pair[i].1);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{pair:?} in order {order:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn start_up_and_generate_errors_say_what_is_wrong_once() {
    // An API keys file error is not a model loading error.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# no keys here\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(["serve", "--port", "0"])
        .env("HUGINN_SERVER_API_KEYS_FILE", &keys)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("API keys file"), "{err}");
    assert!(!err.contains("loading the model"), "{err}");
    // A CUDA device in a build without CUDA: one message, said once.
    if !cfg!(feature = "cuda") {
        let out =
            huginn(&["generate", "--model", fixture_dir().to_str().unwrap(), "--prompt", "x", "--device", "cuda:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.matches("CUDA support").count() + err.matches("cuda support").count(), 1, "{err}");
    }
    // An explicit --max-tokens past the context is refused as the server refuses it (the fixture's
    // context is 256 tokens).
    let out =
        huginn(&["generate", "--model", fixture_dir().to_str().unwrap(), "--prompt", "abcd", "--max-tokens", "300"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("context length is 256"), "{err}");
}

#[test]
fn generate_takes_negative_seeds_as_their_bits_as_the_server_does() {
    let model = fixture_dir();
    let run = |seed: &str| {
        let out = huginn(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The recurrent",
            "--max-tokens",
            "8",
            "--temperature",
            "1",
            "--ignore-eos",
            "--format",
            "json",
            "--seed",
            seed,
        ]);
        json_out(&out)["token_ids"].clone()
    };
    assert_eq!(run("-1"), run("18446744073709551615"));
    assert_ne!(run("-1"), run("1"), "the seed is used");
    let out = huginn(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--seed", "soon"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a 64-bit integer"));
}

/// The README's synopsis of each command lists exactly the flags the command has.
#[test]
fn the_readme_synopses_match_the_commands_flags() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let flags = |text: &str| -> std::collections::BTreeSet<String> {
        let mut found = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices("--") {
            let name: String = text[i + 2..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '-').collect();
            if !name.is_empty() && !["help", "version", "settings"].contains(&name.as_str()) {
                found.insert(name);
            }
        }
        found
    };
    for command in ["generate", "init-random", "train", "eval"] {
        // The synopsis: the README's block that starts with `huginn <command> `.
        let start = readme
            .find(&format!("```sh\nhuginn {command} "))
            .map(|at| at + 6)
            .or_else(|| readme.find(&format!("\nhuginn {command} [")).map(|at| at + 1))
            .unwrap_or_else(|| panic!("no synopsis of {command}"));
        let mut lines = readme[start..].lines();
        let first = lines.next().unwrap().to_string();
        // Its first line and the continuation lines, up to the block's end or the next command.
        let rest: Vec<&str> = lines.take_while(|l| !l.starts_with("```") && !l.starts_with("huginn ")).collect();
        let block = format!("{first}\n{}", rest.join("\n"));
        let help = huginn(&[command, "--help"]);
        let help = String::from_utf8_lossy(&help.stdout).to_string();
        assert_eq!(flags(&block), flags(&help), "README synopsis of `huginn {command}` against --help");
    }
}
