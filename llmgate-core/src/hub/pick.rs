//! Choosing a GGUF file from a repository's file list, and the parts of split models.

/// Chooses the GGUF file to run when the user named only a repository.
///
/// In order of preference: a `Q4_K_M` quantisation (any case: `model-Q4_K_M.gguf`,
/// `gemma-3-270m-q4_k_m.gguf`), another 4-bit one (`Q4_K_S`, `Q4_0`, `IQ4_XS`, …), then
/// the one with the fewest bits per weight, then the first by name. Q4_K_M is the usual
/// balance of size and quality for a laptop.
///
/// A model split into parts (`…-00001-of-00003.gguf`) is represented by its first part;
/// multimodal projectors (`mmproj…`) are GGUF files too but cannot run alone, so they
/// are picked only when nothing else is there. `None` when no file ends in `.gguf`.
pub fn pick_gguf(files: &[String]) -> Option<String> {
    let candidates: Vec<&String> = files
        .iter()
        .filter(|f| is_gguf(f))
        .filter(|f| split_part(f).is_none_or(|part| part.index == 1))
        .collect();
    let models: Vec<&String> = candidates
        .iter()
        .copied()
        .filter(|f| !f.to_ascii_lowercase().contains("mmproj"))
        .collect();
    let pool = if models.is_empty() {
        candidates
    } else {
        models
    };
    pool.into_iter()
        .min_by_key(|f| (preference(f), quant_bits(f).unwrap_or(u32::MAX), *f))
        .cloned()
}

/// Whether the name ends in `.gguf`, in any case.
pub(crate) fn is_gguf(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".gguf")
}

/// Where a file sits in a model split by `gguf-split` into `PREFIX-0000I-of-0000N.gguf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SplitPart<'a> {
    prefix: &'a str,
    extension: &'a str,
    /// 1-based.
    pub(crate) index: u32,
    count: u32,
}

impl SplitPart<'_> {
    /// Every part's name, first to last.
    pub(crate) fn all(&self) -> Vec<String> {
        (1..=self.count)
            .map(|i| {
                format!(
                    "{}-{i:05}-of-{:05}{}",
                    self.prefix, self.count, self.extension
                )
            })
            .collect()
    }
}

/// Reads `PREFIX-00002-of-00003.gguf`; `None` for a file that is not a part.
pub(crate) fn split_part(name: &str) -> Option<SplitPart<'_>> {
    let stem_len = name.len().checked_sub(".gguf".len())?;
    if !is_gguf(name) {
        return None;
    }
    let (stem, extension) = name.split_at(stem_len);
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let number = |digits: &str| {
        (digits.len() == 5 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u32>().ok())
            .flatten()
    };
    let (index, count) = (number(index)?, number(count)?);
    (index >= 1 && index <= count && !prefix.is_empty()).then_some(SplitPart {
        prefix,
        extension,
        index,
        count,
    })
}

/// The files to download for `file`: all parts of a split model, or just `file`.
pub(crate) fn parts_of(file: &str) -> Vec<String> {
    split_part(file).map_or_else(|| vec![file.to_owned()], |part| part.all())
}

/// 0 for Q4_K_M, 1 for other 4-bit K-quants, 2 for Q4_0/Q4_1, 3 for other 4-bit
/// quantisations (IQ4_XS, …), 4 for the rest.
fn preference(name: &str) -> u8 {
    let tokens = tokens(name);
    if tokens.iter().any(|t| t == "q4_k_m") {
        0
    } else if tokens.iter().any(|t| t.starts_with("q4_k")) {
        1
    } else if tokens.iter().any(|t| t == "q4_0" || t == "q4_1") {
        2
    } else if quant_bits(name) == Some(4) {
        3
    } else {
        4
    }
}

/// Bits per weight named in the file name: 4 for `Q4_K_M` or `IQ4_XS`, 16 for `F16`.
fn quant_bits(name: &str) -> Option<u32> {
    tokens(name).iter().find_map(|token| match token.as_str() {
        "f16" | "fp16" | "bf16" => Some(16),
        "f32" | "fp32" => Some(32),
        token => {
            let rest = token
                .strip_prefix("iq")
                .or_else(|| token.strip_prefix('q'))?;
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let after = &rest[digits..];
            // `q4`, `q4_0`, `q4_k_m` — but not `qwen2`.
            (digits > 0 && (after.is_empty() || after.starts_with('_')))
                .then(|| rest[..digits].parse().ok())
                .flatten()
        }
    })
}

/// The lower-cased words of a file name, split where quantisation names are delimited.
fn tokens(name: &str) -> Vec<String> {
    let lower = name.to_ascii_lowercase();
    let stem = lower.strip_suffix(".gguf").unwrap_or(&lower);
    stem.split(['-', '.', '/', ' '])
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_q4_k_m_in_any_case() {
        let files = names(&[
            "README.md",
            "model-Q2_K.gguf",
            "model-Q8_0.gguf",
            "model-Q4_K_M.gguf",
            "model-Q4_0.gguf",
            "config.json",
        ]);
        assert_eq!(pick_gguf(&files).as_deref(), Some("model-Q4_K_M.gguf"));
        let lower = names(&["gemma-3-270m-q8_0.gguf", "gemma-3-270m-q4_k_m.gguf"]);
        assert_eq!(
            pick_gguf(&lower).as_deref(),
            Some("gemma-3-270m-q4_k_m.gguf")
        );
        let dotted = names(&["llama.Q5_K_M.gguf", "llama.Q4_K_M.gguf"]);
        assert_eq!(pick_gguf(&dotted).as_deref(), Some("llama.Q4_K_M.gguf"));
    }

    #[test]
    fn then_other_four_bit_then_fewest_bits_then_name() {
        let four = names(&[
            "m-Q8_0.gguf",
            "m-IQ4_XS.gguf",
            "m-Q4_0.gguf",
            "m-Q4_K_S.gguf",
        ]);
        assert_eq!(pick_gguf(&four).as_deref(), Some("m-Q4_K_S.gguf"));
        let legacy = names(&["m-Q8_0.gguf", "m-IQ4_XS.gguf", "m-Q4_0.gguf"]);
        assert_eq!(pick_gguf(&legacy).as_deref(), Some("m-Q4_0.gguf"));
        let no_four = names(&["m-f16.gguf", "m-Q8_0.gguf", "m-Q6_K.gguf"]);
        assert_eq!(pick_gguf(&no_four).as_deref(), Some("m-Q6_K.gguf"));
        let unnamed = names(&["zeta.gguf", "alpha.gguf"]);
        assert_eq!(pick_gguf(&unnamed).as_deref(), Some("alpha.gguf"));
        // A quantisation-looking model name is not a quantisation.
        let qwen = names(&[
            "qwen2-7b-instruct-fp16.gguf",
            "qwen2-7b-instruct-q5_k_m.gguf",
        ]);
        assert_eq!(
            pick_gguf(&qwen).as_deref(),
            Some("qwen2-7b-instruct-q5_k_m.gguf")
        );
    }

    #[test]
    fn split_models_are_picked_by_their_first_part() {
        let files = names(&[
            "m-Q8_0.gguf",
            "Q4_K_M/m-Q4_K_M-00002-of-00003.gguf",
            "Q4_K_M/m-Q4_K_M-00001-of-00003.gguf",
            "Q4_K_M/m-Q4_K_M-00003-of-00003.gguf",
        ]);
        assert_eq!(
            pick_gguf(&files).as_deref(),
            Some("Q4_K_M/m-Q4_K_M-00001-of-00003.gguf")
        );
        assert_eq!(
            parts_of("Q4_K_M/m-Q4_K_M-00002-of-00003.gguf"),
            names(&[
                "Q4_K_M/m-Q4_K_M-00001-of-00003.gguf",
                "Q4_K_M/m-Q4_K_M-00002-of-00003.gguf",
                "Q4_K_M/m-Q4_K_M-00003-of-00003.gguf",
            ])
        );
        assert_eq!(parts_of("m.gguf"), names(&["m.gguf"]));
        assert_eq!(split_part("m-1-of-3.gguf"), None);
        assert_eq!(split_part("m-00004-of-00003.gguf"), None);
    }

    #[test]
    fn projectors_only_when_alone_and_nothing_without_gguf() {
        let files = names(&["mmproj-model-f16.gguf", "model-Q8_0.gguf"]);
        assert_eq!(pick_gguf(&files).as_deref(), Some("model-Q8_0.gguf"));
        let alone = names(&["mmproj-model-f16.gguf"]);
        assert_eq!(pick_gguf(&alone).as_deref(), Some("mmproj-model-f16.gguf"));
        assert_eq!(pick_gguf(&names(&["model.safetensors", "README.md"])), None);
        assert_eq!(pick_gguf(&[]), None);
    }
}
