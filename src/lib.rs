//! huginn: an inference runtime and server for recurrent-depth language models (Huginn-0125 and any
//! checkpoint of its architecture).

pub mod bench;
pub mod checkpoint;
pub mod cpu_threads;
pub mod engine;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod server;
pub mod settings;
pub mod text;
pub mod train;
