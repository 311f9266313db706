//! `huginn generate`: one prompt, one continuation, streamed as text or summarised as JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use huginn::engine::{Driver, Event, JobSpec};
use huginn::generate::{FreezeRule, GenerationRequest, RequestContext, SamplerKind, fit_context};
use huginn::model::{BackendChoice, CacheStrategy, DTypeChoice, DeviceSpec, ExitCriterion, ExitKv, HuginnModel};
use huginn::settings::Settings;
use huginn::text::{ChatMessage, TextTokenizer};

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text (tokenized with the checkpoint's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Render the prompt as a user message with the chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Recurrence steps per token (the cap when an exit criterion is set). Default: the model's mean_recurrence.
    #[arg(long)]
    num_steps: Option<usize>,
    /// none, latent-diff, cosine, kl, minp-kl, entropy-diff, argmax-stability, gate (Ouro).
    #[arg(long)]
    exit_criterion: Option<ExitCriterion>,
    /// Threshold of the exit criterion (default: the reference's for that criterion).
    #[arg(long)]
    exit_threshold: Option<f64>,
    /// Steps before the exit criterion is first checked.
    #[arg(long)]
    min_steps: Option<usize>,
    /// What an early exit does to the K/V of the loops it skips: skip (stop computing) or fill
    /// (run them for their K/V; the output stays the exit loop's).
    #[arg(long)]
    exit_kv: Option<ExitKv>,
    /// Scale of the random initial latent state (0: zeros, deterministic).
    #[arg(long)]
    init_scale: Option<f64>,
    /// Start each token from the previous token's final latent state.
    #[arg(long)]
    continuous_compute: bool,
    /// Self-speculative decoding: recurrence steps per drafted token (below --num-steps).
    #[arg(long)]
    draft_steps: Option<usize>,
    /// Tokens drafted per speculation round (with --draft-steps).
    #[arg(long)]
    draft_tokens: Option<usize>,
    /// sequential (one token at a time) or parallel (the diffusion-forcing sampler).
    #[arg(long)]
    sampler: Option<SamplerKind>,
    /// Parallel sampler: core steps per sampler step (r', 1..--num-steps).
    #[arg(long)]
    inner_steps: Option<usize>,
    /// Parallel sampler: latent-diff, latent-diff-strict or fixed.
    #[arg(long)]
    freeze: Option<FreezeRule>,
    /// Parallel sampler: most positions in flight.
    #[arg(long)]
    max_wavefront: Option<usize>,
    /// Parallel sampler: noise mixed into the states each sampler step, damped by steps so far.
    #[arg(long)]
    state_noise: Option<f64>,
    /// Parallel sampler: weight of a position's previous input embedding.
    #[arg(long)]
    embed_ema: Option<f64>,
    /// 0 is greedy.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    /// 0 disables.
    #[arg(long)]
    min_p: Option<f64>,
    /// 1 disables.
    #[arg(long)]
    repetition_penalty: Option<f64>,
    #[arg(long)]
    presence_penalty: Option<f64>,
    #[arg(long)]
    frequency_penalty: Option<f64>,
    /// Extra stop token ids (comma-separated), in addition to the checkpoint's.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Do not stop on the checkpoint's end-of-text tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Any 64-bit pattern: negative numbers are taken as their bits, as a request's `seed` is.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_seed)]
    seed: Option<u64>,
    /// `full` (one K/V slot per step) or `shared:K` (K slots reused round-robin).
    #[arg(long)]
    kv_cache: Option<CacheStrategy>,
    /// auto (the checkpoint's torch_dtype), f32, bf16 or f16.
    #[arg(long)]
    dtype: Option<DTypeChoice>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// auto (CPU kernels on the CPU, tensor ops elsewhere) or tensor.
    #[arg(long)]
    backend: Option<BackendChoice>,
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
}

/// A seed as the server takes one (a signed 64-bit integer, negative ones as their bits) or any
/// unsigned 64-bit value.
fn parse_seed(text: &str) -> Result<u64, String> {
    text.parse::<i64>()
        .map(|seed| seed as u64)
        .or_else(|_| text.parse::<u64>())
        .map_err(|_| format!("`{text}` is not a 64-bit integer"))
}

/// A count from a flag as a request field (a count past `i64::MAX` is out of every range anyway).
fn count(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn run(args: GenerateArgs, settings: Settings) -> anyhow::Result<()> {
    let device = args.device.unwrap_or(settings.model.device).open()?;
    let dir = args
        .model
        .or(settings.model.path.clone())
        .or_else(huginn::settings::default_model_dir)
        .context("the default model is missing: give --model DIR (or set model.path in the settings)")?;
    let dtype = args.dtype.unwrap_or(settings.model.dtype).fixed();
    let backend = args.backend.unwrap_or(settings.model.backend);
    let model = HuginnModel::load_with(&dir, &device, dtype, backend).context("loading the model")?;
    settings.check_for_model(model.config())?;
    let tokenizer = TextTokenizer::load(&dir, model.config()).context("loading the tokenizer")?;
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) if args.chat => {
            tokenizer.encode(&tokenizer.apply_chat_template(&[ChatMessage::new("user", text)], true)?)?
        }
        (Some(text), _) => tokenizer.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    // The same resolution and ranges as a request to the server (request, settings, model).
    let request = GenerationRequest {
        max_tokens: args.max_tokens.map(count),
        num_steps: args.num_steps.map(count),
        // Elastic depth needs a loaded server to act on: one generation runs at num_steps.
        min_num_steps: None,
        exit_criterion: args.exit_criterion,
        exit_threshold: args.exit_threshold,
        exit_kv: args.exit_kv,
        min_steps: args.min_steps.map(count),
        max_total_steps: None,
        init_scale: args.init_scale,
        continuous_compute: args.continuous_compute.then_some(true),
        draft_steps: args.draft_steps.map(count),
        draft_tokens: args.draft_tokens.map(count),
        sampler: args.sampler,
        inner_steps: args.inner_steps.map(count),
        freeze: args.freeze,
        max_wavefront: args.max_wavefront.map(count),
        state_noise: args.state_noise,
        embed_ema: args.embed_ema,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k.map(count),
        min_p: args.min_p,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        repetition_penalty: args.repetition_penalty,
        // Taken back as the same 64 bits.
        seed: args.seed.map(|s| s as i64),
        stop_token_ids: (!args.stop_token_ids.is_empty())
            .then(|| args.stop_token_ids.iter().map(|&id| i64::from(id)).collect()),
        ignore_eos: args.ignore_eos.then_some(true),
        logit_bias: None,
        kv_cache: args.kv_cache,
    };
    let context = RequestContext {
        defaults: &settings.generation,
        limits: &settings.limits,
        mean_recurrence: model.config().mean_recurrence,
        vocab_size: model.config().vocab_size,
        stop_token_ids: &tokenizer.special().stop,
    };
    let resolved = request.resolve(&context)?;
    let mut params = resolved.params;
    let (block_size, longest) = (model.config().block_size, settings.limits.max_prompt_tokens);
    fit_context(prompt_ids.len(), &mut params.max_tokens, resolved.max_tokens_explicit, block_size, longest)?;

    let mut stdout = std::io::stdout().lock();
    let streaming = matches!(args.format, OutputFormat::Text);
    let mut stream_error = None;
    let model = std::sync::Arc::new(model);
    let mut driver = Driver::new(model, std::sync::Arc::new(tokenizer), 1);
    let mut outcomes = driver.run(vec![JobSpec::new(prompt_ids.clone(), params)], |_, event| {
        let text = match event {
            Event::Token { text, .. } | Event::Finished { text, .. } => text,
            _ => return,
        };
        if streaming
            && stream_error.is_none()
            && let Err(e) = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush())
        {
            stream_error = Some(e);
        }
    })?;
    if let Some(e) = stream_error {
        return Err(e).context("writing to stdout");
    }
    let output = outcomes.pop().and_then(|mut c| c.pop()).context("the job ended without a choice")?;
    let generated = output.token_ids.len();
    let total_steps: usize = output.steps_per_token.iter().sum();
    let decode_tokens = generated.saturating_sub(1);
    let decode_steps = output.decode_steps();
    let decode_seconds = output.seconds - output.first_token_seconds;
    let timing = json!({
        "prefill_seconds": output.first_token_seconds,
        "decode_seconds": decode_seconds,
        "decode_tokens_per_second": if decode_seconds > 0.0 { decode_tokens as f64 / decode_seconds } else { 0.0 },
        "core_steps_per_second": if decode_seconds > 0.0 { decode_steps as f64 / decode_seconds } else { 0.0 },
    });
    match args.format {
        OutputFormat::Text => {
            writeln!(stdout)?;
            eprintln!(
                "[{generated} tokens, finish_reason {:?}, mean {:.2} steps/token, {:.1} tokens/s, kv {} bytes{}]",
                output.finish_reason,
                total_steps as f64 / generated.max(1) as f64,
                timing["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
                output.kv_bytes,
                match output.drafts().drafted {
                    0 => String::new(),
                    drafted => format!(", {} of {drafted} drafts accepted", output.drafts().accepted),
                }
            );
        }
        OutputFormat::Json => {
            let body = json!({
                "prompt_ids": prompt_ids,
                "token_ids": output.token_ids,
                "text": output.text,
                "steps_per_token": output.steps_per_token,
                "mean_steps_per_token": total_steps as f64 / generated.max(1) as f64,
                "finish_reason": output.finish_reason,
                "kv_bytes": output.kv_bytes,
                "draft_tokens": output.drafts().drafted,
                "accepted_draft_tokens": output.drafts().accepted,
                "sampler_steps": output.waves().steps,
                "tokens_per_sampler_step": output.waves().tokens_per_step(),
                "mean_wavefront": output.waves().mean_wavefront(),
                "timing": timing,
            });
            writeln!(stdout, "{}", serde_json::to_string(&body)?)?;
        }
    }
    Ok(())
}
