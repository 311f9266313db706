//! Tests of the settings: files, environment overrides and their validation.

use super::*;
use crate::model::{CacheStrategy, ExitCriterion};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn defaults_then_file_then_environment() {
    let file = "[generation]\nnum_steps = 16\nkv_cache = \"full\"\n[model]\ndtype = \"bf16\"\n";
    let s = Settings::from_sources(file, Path::new("f.toml"), env(&[])).unwrap();
    assert_eq!(s.generation.num_steps, Some(16));
    assert_eq!(s.generation.kv_cache, CacheStrategy::Full);
    assert_eq!(s.generation.max_tokens, 32, "untouched keys keep their defaults");
    assert_eq!(s.model.dtype, DTypeChoice::Fixed(candle_core::DType::BF16));
    let vars = env(&[("HUGINN_GENERATION_NUM_STEPS", "8"), ("HUGINN_MODEL_PATH", "/models/x"), ("PATH", "/bin")]);
    let s = Settings::from_sources(file, Path::new("f.toml"), vars).unwrap();
    assert_eq!(s.generation.num_steps, Some(8));
    assert_eq!(s.model.path.as_deref(), Some(Path::new("/models/x")));
}

#[test]
fn the_shipped_default_file_parses_and_equals_the_built_in_defaults() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")).unwrap();
    let s = Settings::from_sources(&text, Path::new(DEFAULT_FILE), env(&[])).unwrap();
    assert_eq!(s, Settings::default());
}

#[test]
fn devices_come_as_a_list_or_one_comma_separated_string() {
    let s = Settings::from_sources("[model]\ndevices = [\"cpu\", \"cpu\"]\n", Path::new("f.toml"), env(&[])).unwrap();
    assert_eq!(s.model.worker_devices().unwrap(), vec![DeviceSpec::Cpu, DeviceSpec::Cpu]);
    let vars = env(&[("HUGINN_MODEL_DEVICES", "cuda:0,cuda:1"), ("HUGINN_MODEL_BACKEND", "tensor")]);
    let s = Settings::from_sources("", Path::new("f.toml"), vars).unwrap();
    assert_eq!(s.model.devices.0, vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
    assert_eq!(s.model.backend, BackendChoice::Tensor);
    assert_eq!(Settings::default().model.worker_devices().unwrap(), vec![DeviceSpec::Cpu]);
    for (var, value) in
        [("HUGINN_MODEL_DEVICES", "cpu,gpu"), ("HUGINN_MODEL_BACKEND", "fast"), ("HUGINN_MODEL_DTYPE", "int4")]
    {
        let err = Settings::from_sources("", Path::new("f.toml"), env(&[(var, value)])).unwrap_err();
        assert!(err.to_string().starts_with(&format!("environment variable {var}")), "{err}");
    }
    let err = Settings::from_sources("[model]\nbackend = \"gpu\"\n", Path::new("f.toml"), env(&[])).unwrap_err();
    assert!(err.to_string().contains("backend"), "{err}");
}

#[test]
fn generation_defaults_are_typed_and_checked_at_load() {
    let s = Settings::from_sources(
        "[generation]\nexit_criterion = \"kl\"\nkv_cache = \"shared:2\"\n",
        Path::new("f.toml"),
        env(&[]),
    )
    .unwrap();
    assert_eq!((s.generation.exit_criterion, s.generation.kv_cache), (ExitCriterion::Kl, CacheStrategy::Shared(2)));
    let err =
        Settings::from_sources("", Path::new("f.toml"), env(&[("HUGINN_GENERATION_KV_CACHE", "bogus")])).unwrap_err();
    assert!(err.to_string().starts_with("environment variable HUGINN_GENERATION_KV_CACHE"), "{err}");
    let s = Settings::from_sources("[generation]\nexit_kv = \"fill\"\n", Path::new("f.toml"), env(&[])).unwrap();
    assert_eq!(s.generation.exit_kv, crate::model::ExitKv::Fill);
    let err = Settings::from_sources("", Path::new("f.toml"), env(&[("HUGINN_GENERATION_EXIT_KV", "sometimes")]))
        .unwrap_err();
    assert!(err.to_string().starts_with("environment variable HUGINN_GENERATION_EXIT_KV"), "{err}");
    for (file, key) in [
        ("[generation]\ntemperature = 2.5\n", "generation.temperature"),
        ("[generation]\ntop_p = 0\n", "generation.top_p"),
        ("[generation]\ninit_scale = -1\n", "generation.init_scale"),
        ("[generation]\nnum_steps = 0\n", "generation.num_steps"),
        ("[generation]\nnum_steps = 4\nmin_steps = 5\n", "generation.min_steps"),
        ("[generation]\nexit_criterion = \"kl\"\nexit_threshold = -1\n", "generation.exit_threshold"),
        ("[generation]\nexit_criterion = \"gate\"\nexit_threshold = 1.5\n", "generation.exit_threshold"),
        ("[generation]\nnum_steps = 4\ndraft_steps = 4\n", "generation.draft_steps"),
        ("[generation]\ndraft_steps = 0\n", "generation.draft_steps"),
        ("[generation]\ndraft_steps = 2\ncontinuous_compute = true\n", "generation.draft_steps"),
        ("[generation]\ndraft_tokens = 0\n", "generation.draft_tokens"),
        ("[generation]\ndraft_tokens = 17\n", "generation.draft_tokens"),
        ("[limits]\nmax_draft_tokens = 0\n", "limits.max_draft_tokens"),
        ("[generation]\nmin_num_steps = 0\n", "generation.min_num_steps"),
        ("[engine]\ntarget_itl_ms = 0\n", "engine.target_itl_ms"),
        ("[engine]\ntarget_queue_ms = 0\n", "engine.target_queue_ms"),
    ] {
        let err = Settings::from_sources(file, Path::new("f.toml"), env(&[])).unwrap_err();
        assert!(err.to_string().starts_with(&format!("setting `{key}`")), "{file}: {err}");
    }
}

#[test]
fn elastic_depth_settings_parse_into_targets_and_a_floor() {
    let load = |file: &str, vars: &[(&str, &str)]| Settings::from_sources(file, Path::new("f.toml"), env(vars));
    let s = load("", &[]).unwrap();
    assert!(!s.engine.elastic_targets().is_on());
    assert_eq!(s.generation.min_num_steps, None);
    let vars = [("HUGINN_ENGINE_TARGET_ITL_MS", "40"), ("HUGINN_GENERATION_MIN_NUM_STEPS", "3")];
    let s = load("[engine]\ntarget_queue_ms = 200\n", &vars).unwrap();
    let targets = s.engine.elastic_targets();
    assert_eq!(targets.itl, Some(std::time::Duration::from_millis(40)));
    assert_eq!(targets.queue, Some(std::time::Duration::from_millis(200)));
    assert_eq!(s.generation.min_num_steps, Some(3));
    // A floor above the default depth is cut to it, as a request's default floor is.
    assert!(load("[generation]\nnum_steps = 4\nmin_num_steps = 8\n", &[]).is_ok());
    let err = load("", &[("HUGINN_ENGINE_TARGET_ITL_MS", "-5")]).unwrap_err().to_string();
    assert!(err.starts_with("environment variable HUGINN_ENGINE_TARGET_ITL_MS"), "{err}");
}

#[test]
fn the_prefix_cache_fits_in_the_kv_budget() {
    let load = |file: &str, vars: &[(&str, &str)]| Settings::from_sources(file, Path::new("f.toml"), env(vars));
    assert_eq!(load("", &[]).unwrap().engine.prefix_cache_bytes, 1 << 30);
    let s = load("[engine]\nprefix_cache_bytes = 0\n", &[]).unwrap();
    assert_eq!(s.engine.prefix_cache_bytes, 0);
    let s = load("", &[("HUGINN_ENGINE_PREFIX_CACHE_BYTES", "1048576")]).unwrap();
    assert_eq!(s.engine.prefix_cache_bytes, 1 << 20);
    let err = load("[engine]\nmax_kv_bytes = 1000\nprefix_cache_bytes = 1001\n", &[]).unwrap_err().to_string();
    assert!(err.starts_with("setting `engine.prefix_cache_bytes`: must be at most engine.max_kv_bytes"), "{err}");
    for value in ["-1", "lots"] {
        let err = load("", &[("HUGINN_ENGINE_PREFIX_CACHE_BYTES", value)]).unwrap_err().to_string();
        assert!(err.starts_with("environment variable HUGINN_ENGINE_PREFIX_CACHE_BYTES"), "{value}: {err}");
    }
}

#[test]
fn related_variables_are_validated_once_merged_in_any_order() {
    let pairs = [
        [("HUGINN_GENERATION_DRAFT_TOKENS", "20"), ("HUGINN_LIMITS_MAX_DRAFT_TOKENS", "32")],
        [("HUGINN_GENERATION_MAX_WAVEFRONT", "300"), ("HUGINN_LIMITS_MAX_WAVEFRONT", "512")],
        [("HUGINN_ENGINE_MAX_TICK_ROWS", "16"), ("HUGINN_ENGINE_MAX_ACTIVE_SEQUENCES", "8")],
        [("HUGINN_ENGINE_MAX_ACTIVE_SEQUENCES", "2"), ("HUGINN_ENGINE_MAX_TICK_ROWS", "3")],
        [("HUGINN_GENERATION_NUM_STEPS", "300"), ("HUGINN_LIMITS_MAX_NUM_STEPS", "512")],
    ];
    for [a, b] in pairs {
        for vars in [[a, b], [b, a]] {
            let result = Settings::from_sources("", Path::new("f.toml"), env(&vars));
            assert!(result.is_ok(), "{vars:?}: {}", result.unwrap_err());
        }
    }
    // A rule that fails names the variable that set the key.
    let vars = [("HUGINN_LIMITS_MAX_DRAFT_TOKENS", "8"), ("HUGINN_GENERATION_DRAFT_TOKENS", "9")];
    let err = Settings::from_sources("", Path::new("f.toml"), env(&vars)).unwrap_err().to_string();
    assert!(
        err.starts_with("environment variable HUGINN_GENERATION_DRAFT_TOKENS: setting `generation.draft_tokens`"),
        "{err}"
    );
}

#[test]
fn every_limit_and_count_must_let_something_through() {
    for key in [
        "limits.max_num_steps",
        "limits.max_tokens",
        "limits.max_n",
        "limits.max_total_steps",
        "limits.max_prompt_tokens",
        "limits.max_constraint_bytes",
        "engine.queue_capacity",
        "engine.max_active_sequences",
        "server.max_concurrent_requests",
        "server.max_body_bytes",
    ] {
        let (section, name) = key.split_once('.').unwrap();
        let extra = if key == "engine.max_active_sequences" { "max_tick_rows = 0\n" } else { "" };
        let file = format!("[{section}]\n{name} = 0\n{extra}");
        let err = Settings::from_sources(&file, Path::new("f.toml"), env(&[])).unwrap_err().to_string();
        assert_eq!(err, format!("setting `{key}`: must be at least 1"), "{file}");
    }
    for (file, key) in [
        ("[generation]\nnum_steps = 1000\n", "generation.num_steps"),
        ("[generation]\nmax_tokens = 5000\n", "generation.max_tokens"),
    ] {
        let err = Settings::from_sources(file, Path::new("f.toml"), env(&[])).unwrap_err().to_string();
        assert!(err.starts_with(&format!("setting `{key}`: must be at most limits.")), "{err}");
    }
}

#[test]
fn defaults_that_depend_on_the_depth_are_checked_against_the_model() {
    let load = |file: &str| Settings::from_sources(file, Path::new("f.toml"), env(&[])).unwrap();
    let model_default = &HuginnConfig { mean_recurrence: 8, ..crate::checkpoint::preset("tiny").unwrap() };
    for (file, key) in [
        ("[generation]\ndraft_steps = 8\n", "generation.draft_steps"),
        ("[generation]\nmin_steps = 100\n", "generation.min_steps"),
        ("[generation]\nsampler = \"parallel\"\ninner_steps = 9\n", "generation.inner_steps"),
        ("[limits]\nmax_num_steps = 4\n", "limits.max_num_steps"),
        // The gate criterion needs a model with an exit gate (this one has none).
        ("[generation]\nexit_criterion = \"gate\"\n", "generation.exit_criterion"),
    ] {
        let settings = load(file);
        let err = settings.check_for_model(model_default).unwrap_err().to_string();
        assert!(err.starts_with(&format!("setting `{key}`")), "{file}: {err}");
    }
    assert!(load("[generation]\ndraft_steps = 7\n").check_for_model(model_default).is_ok());
    let set = load("[generation]\nnum_steps = 4\n[limits]\nmax_num_steps = 4\n");
    assert!(set.check_for_model(model_default).is_ok(), "generation.num_steps replaces the model's depth");
    let vars = env(&[("HUGINN_GENERATION_DRAFT_STEPS", "8")]);
    let err =
        Settings::from_sources("", Path::new("f.toml"), vars).unwrap().check_for_model(model_default).unwrap_err();
    assert!(err.to_string().starts_with("environment variable HUGINN_GENERATION_DRAFT_STEPS"), "{err}");
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let err = Settings::from_sources("[generation]\nnum_step = 3\n", Path::new("f.toml"), env(&[])).unwrap_err();
    assert!(err.to_string().starts_with("f.toml:") && err.to_string().contains("num_step"), "{err}");
    let err =
        Settings::from_sources("", Path::new("f.toml"), env(&[("HUGINN_GENERATION_MAX_TOKENS", "many")])).unwrap_err();
    assert!(err.to_string().starts_with("environment variable HUGINN_GENERATION_MAX_TOKENS"), "{err}");
}
