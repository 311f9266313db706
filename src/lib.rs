//! huginn: an inference runtime and server for recurrent-depth language models (Huginn-0125 and any
//! checkpoint of its architecture).

pub mod checkpoint;
pub mod generate;
pub mod model;
pub mod text;
