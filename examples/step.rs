use candle_core::{DType, Device, Tensor};
use huginn::model::{CacheStrategy, HuginnModel};
use huginn::model::layers::Chunk;
use std::time::Instant;
fn main() {
    huginn::cpu_threads::configure();
    let dir = std::path::Path::new("target/bench-models/width-1024");
    let dtype = if std::env::var("F32").is_ok() { DType::F32 } else { DType::BF16 };
    let model = HuginnModel::load(dir, dtype, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| 100 + i).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
    for rows in [1usize, 16, 1, 16] {
        let mut caches: Vec<_> = (0..rows).map(|_| model.new_cache(CacheStrategy::Shared(1))).collect();
        // fill caches: prelude over 40 tokens then 1 core step and coda
        for c in caches.iter_mut() {
            let inj = model.prelude(&ids, &mut [Chunk { cache: c, start: 0, len: 40, step: 0 }]).unwrap();
            let st = model.init_state(40, 0.0, &mut rand::rng()).unwrap();
            let st = model.core_step(&st, &inj, &mut [Chunk { cache: c, start: 0, len: 40, step: 0 }]).unwrap();
            let _ = model.coda(&st, &mut [Chunk { cache: c, start: 0, len: 40, step: 0 }], huginn::model::LogitRows::Last).unwrap();
        }
        let next = vec![7u32; rows];
        let mut chunks: Vec<Chunk> = caches.iter_mut().map(|c| Chunk { cache: c, start: 40, len: 1, step: 0 }).collect();
        let inj = model.prelude(&next, &mut chunks).unwrap();
        let mut st = model.init_state(rows, 0.0, &mut rand::rng()).unwrap();
        let t = Instant::now();
        huginn::model::linear::LIN_NS.store(0, std::sync::atomic::Ordering::Relaxed);
        huginn::model::linear::APP_NS.store(0, std::sync::atomic::Ordering::Relaxed);
        huginn::model::linear::ATT_NS.store(0, std::sync::atomic::Ordering::Relaxed);
        let n = 64;
        for s in 0..n {
            for ch in chunks.iter_mut() { ch.step = s; }
            st = model.core_step(&st, &inj, &mut chunks).unwrap();
        }
        let el = t.elapsed().as_secs_f64() / n as f64;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6 / n as f64;
        use huginn::model::linear::{LIN_NS, APP_NS, ATT_NS};
        println!("rows {rows}: {:.2} ms per core step, linear {:.2} ms append {:.2} attend {:.2}", el * 1e3, g(&LIN_NS), g(&APP_NS), g(&ATT_NS));
        let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
    }
    });
}
