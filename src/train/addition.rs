//! The training task: integer addition written left to right, `a+b=` followed by the sum and the
//! end token, as a completion (`472+389=` -> `861<|end_text|>`) and as a chat turn (user `472+389=`,
//! assistant `861<|end_turn|>`). The most significant digit of the sum comes first and depends on
//! the carries of all lower digits: the kind of sequential computation more recurrence helps with.
//!
//! Problems are split once and for all into a training part and a held-out part (one pair in ten,
//! by a hash of the pair), so that evaluation problems are never seen in training.

use std::path::Path;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::model::{ModelError, Result};
use crate::text::{ChatMessage, TextTokenizer};

/// `task.json` in a checkpoint folder: what the model was trained on, which `huginn eval` takes
/// its defaults from (`{"task": "addition", "digits": 6}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFile {
    pub task: String,
    /// Operands below `10^digits`.
    pub digits: u32,
}

impl TaskFile {
    pub const NAME: &'static str = "task.json";

    pub fn addition(digits: u32) -> Self {
        Self { task: "addition".to_string(), digits }
    }

    /// The task of the checkpoint in `dir`: `None` without a `task.json`, an error for one that
    /// is not an addition task file.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(Self::NAME);
        if !path.is_file() {
            return Ok(None);
        }
        let bad = |message: String| ModelError::InvalidArgument(format!("{}: {message}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let task: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if task.task != "addition" || !(1..=MAX_DIGITS).contains(&task.digits) {
            return Err(bad(format!("expected an addition task with 1 to {MAX_DIGITS} digits, got {text}")));
        }
        Ok(Some(task))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| ModelError::Io { path: path.to_path_buf(), message: e.to_string() })
    }
}

/// The most digits an operand may have (sums stay far inside u64).
pub const MAX_DIGITS: u32 = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Held,
}

impl Problem {
    pub fn prompt(&self) -> String {
        format!("{}+{}=", self.a, self.b)
    }

    pub fn answer(&self) -> String {
        (self.a + self.b).to_string()
    }

    pub fn split(&self) -> Split {
        // splitmix64 of the pair: a fixed, well-mixed partition.
        let mut z = (self.a << 32 ^ self.b).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if z.is_multiple_of(10) { Split::Held } else { Split::Train }
    }

    /// A uniform problem with operands below `10^digits` from `split`.
    pub fn sample(digits: u32, split: Split, rng: &mut impl Rng) -> Self {
        let bound = 10u64.pow(digits);
        loop {
            let p = Problem { a: rng.random_range(0..bound), b: rng.random_range(0..bound) };
            if p.split() == split {
                return p;
            }
        }
    }

    /// A training problem: each operand's digit count uniform in `1..=digits`, then its value
    /// uniform among numbers of that many digits. Short problems are as common as long ones, so the
    /// model sees the same procedure at every length.
    pub fn sample_mixed(digits: u32, rng: &mut impl Rng) -> Self {
        let operand = |rng: &mut _| {
            let n = RngExt::random_range(rng, 1..=digits);
            let low = if n == 1 { 0 } else { 10u64.pow(n - 1) };
            RngExt::random_range(rng, low..10u64.pow(n))
        };
        loop {
            let p = Problem { a: operand(rng), b: operand(rng) };
            if p.split() == Split::Train {
                return p;
            }
        }
    }
}

/// A tokenized example: the ids and, for each of the `ids.len() - 1` next-token predictions,
/// whether it is scored (the answer digits and the end token).
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub scored: Vec<bool>,
}

/// Turns problems into token ids with the checkpoint's tokenizer and chat template.
pub struct Formatter<'a> {
    tokenizer: &'a TextTokenizer,
    end_text: u32,
    end_turn: u32,
}

impl<'a> Formatter<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Result<Self> {
        let id = |name: &str| {
            tokenizer
                .token_to_id(name)
                .ok_or_else(|| ModelError::InvalidArgument(format!("the tokenizer has no {name} token")))
        };
        Ok(Self { tokenizer, end_text: id("<|end_text|>")?, end_turn: id("<|end_turn|>")? })
    }

    /// The prompt as the server sends it: raw text for completions, the rendered template for chat.
    pub fn prompt_ids(&self, problem: &Problem, chat: bool) -> Result<Vec<u32>> {
        if chat {
            let text = self.tokenizer.apply_chat_template(&[ChatMessage::new("user", &problem.prompt())], true)?;
            self.tokenizer.encode(&text)
        } else {
            self.tokenizer.encode(&problem.prompt())
        }
    }

    pub fn example(&self, problem: &Problem, chat: bool) -> Result<Example> {
        let mut ids = self.prompt_ids(problem, chat)?;
        let prompt_len = ids.len();
        ids.extend(self.tokenizer.encode(&problem.answer())?);
        ids.push(if chat { self.end_turn } else { self.end_text });
        let scored = (1..ids.len()).map(|i| i >= prompt_len).collect();
        Ok(Example { ids, scored })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn the_split_holds_out_about_one_pair_in_ten_and_sampling_respects_it() {
        let held = (0..1000u64)
            .flat_map(|a| (0..100u64).map(move |b| Problem { a, b }))
            .filter(|p| p.split() == Split::Held)
            .count();
        assert!((8_000..12_000).contains(&held), "{held}");
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let p = Problem::sample(3, Split::Held, &mut rng);
            assert_eq!(p.split(), Split::Held);
            assert!(p.a < 1000 && p.b < 1000);
        }
        assert_eq!(Problem { a: 472, b: 389 }.prompt(), "472+389=");
        assert_eq!(Problem { a: 472, b: 389 }.answer(), "861");
    }

    #[test]
    fn task_files_round_trip_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("huginn-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(TaskFile::read(&dir).unwrap(), None);
        TaskFile::addition(6).write(&dir.join(TaskFile::NAME)).unwrap();
        assert_eq!(TaskFile::read(&dir).unwrap(), Some(TaskFile::addition(6)));
        for bad in [r#"{"task": "sorting", "digits": 6}"#, r#"{"task": "addition", "digits": 0}"#, "{"] {
            std::fs::write(dir.join(TaskFile::NAME), bad).unwrap();
            assert!(TaskFile::read(&dir).unwrap_err().to_string().contains("task.json"), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
