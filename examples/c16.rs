// ad-hoc: the serving bench's width-1024 c1 vs c16 measurement only (not committed)
use std::sync::Arc;

use candle_core::{DType, Device};
use huginn::bench::load::{closed_loop, engine_for};
use huginn::model::HuginnModel;
use huginn::text::TextTokenizer;

const PROMPT: [u32; 8] = [84, 104, 101, 32, 99, 111, 114, 101];

fn main() {
    huginn::cpu_threads::configure();
    let dir = std::path::Path::new("target/bench-models/width-1024");
    let dtype = if std::env::var("BF16").is_ok() { DType::BF16 } else { DType::F32 };
    let model = Arc::new(HuginnModel::load(dir, dtype, &Device::Cpu).unwrap());
    let tok = Arc::new(TextTokenizer::load(dir, model.config()).unwrap());
    let engine = engine_for(model, tok, 64);
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let which = args.get(2).map(String::as_str).unwrap_or("both");
    let tokens: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let mut one = 0.0;
    if which != "16" {
        let r = closed_loop(&engine, &PROMPT, steps, 1, 2, tokens);
        one = r.tokens_per_second();
        println!("c1: {one:.2} tok/s");
    }
    if which != "1" {
        let r = closed_loop(&engine, &PROMPT, steps, 16, 1, tokens);
        let sixteen = r.tokens_per_second();
        println!("c16: {sixteen:.2} tok/s ratio {:.2}", sixteen / one.max(1e-9));
    }
}
