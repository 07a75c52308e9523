//! Reading the layers: which file, then figment, then the checks.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;

use super::problem;
use super::{
    Config, ConfigError, Problem, Sources, Webhook, CONFORM_TOKEN_VARIABLE, DEFAULT_CONFIG_PATH,
    DEFAULT_CONFIG_TOML, INSTALLED_CONFIG_PATH,
};

/// The built-in defaults as a layer of their own, so that messages can name them.
struct BuiltIn;

impl figment::Provider for BuiltIn {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(problem::BUILT_IN)
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Toml::string(DEFAULT_CONFIG_TOML).data()
    }
}

impl Config {
    /// Reads the layers. `path` is the `--config` option; `LINKID_CONFIG` is
    /// its fallback, then `./config.toml` if it exists, then
    /// `/etc/linkid/config.toml` if that exists.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let named = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("LINKID_CONFIG").map(PathBuf::from));
        let mut read = vec![problem::BUILT_IN.to_string()];
        let mut figment = Figment::from(BuiltIn);
        let file = match named {
            Some(file) => {
                let file = absolute(&file);
                if !file.is_file() {
                    let problem = Problem::new(
                        "",
                        format!(
                            "the config file {} does not exist or is not a file",
                            file.display()
                        ),
                        "pass an existing file with --config or LINKID_CONFIG",
                    );
                    return Err(ConfigError {
                        read,
                        ..ConfigError::one(problem)
                    });
                }
                let how = if path.is_some() {
                    "--config"
                } else {
                    "LINKID_CONFIG"
                };
                read.push(format!("{} ({how})", file.display()));
                Some(file)
            }
            None => match unnamed_file(Path::new("."), Path::new(INSTALLED_CONFIG_PATH)) {
                Ok((file, what)) => {
                    read.push(what);
                    file
                }
                Err(problem) => {
                    return Err(ConfigError {
                        read,
                        ..ConfigError::one(problem)
                    })
                }
            },
        };
        if let Some(file) = &file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let mut variables: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| {
                name.starts_with("LINKID_")
                    && name != "LINKID_CONFIG"
                    && name != CONFORM_TOKEN_VARIABLE
            })
            .collect();
        variables.sort();
        read.extend(variables);
        let figment = figment.merge(
            Env::prefixed("LINKID_")
                .filter(|key| {
                    !key.as_str().eq_ignore_ascii_case("config")
                        && !CONFORM_TOKEN_VARIABLE
                            .strip_prefix("LINKID_")
                            .is_some_and(|name| key.as_str().eq_ignore_ascii_case(name))
                })
                .split("__"),
        );
        Self::checked(figment, read, file)
    }

    /// The built-in defaults alone, for a command that reads no config file.
    pub fn defaults() -> Result<Config, ConfigError> {
        Self::checked(
            Figment::from(BuiltIn),
            vec![problem::BUILT_IN.to_string()],
            None,
        )
    }

    /// Extracts and checks a configuration from any figment (tests use this).
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        Self::checked(figment, Vec::new(), None)
    }

    /// Reports every problem of every layer at once (see `problem::extract`).
    fn checked(
        figment: Figment,
        read: Vec<String>,
        file: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let defaults = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .find_value("")
            .expect("the built-in defaults parse");
        let extracted = problem::extract::<Config>(&figment, &defaults);
        let sources = Sources::new(read.clone(), file, extracted.origins);
        let mut problems = extracted.problems;
        if let Some(config) = &extracted.value {
            // A mended value is the default, not the user's: checking it
            // would only repeat the problem.
            let mended = &extracted.mended;
            problems.extend(config.problems().into_iter().filter(|p| {
                !mended.iter().any(|m| {
                    p.key == *m
                        || p.key.starts_with(&format!("{m}."))
                        || p.key.starts_with(&format!("{m}["))
                })
            }));
        }
        match extracted.value {
            Some(mut config) if problems.is_empty() => {
                config.sources = sources;
                // Relative paths stay relative to the working directory;
                // messages and logs show where that put them.
                if !config.database.path.as_os_str().is_empty() {
                    config.database.path = absolute(&config.database.path);
                }
                if !config.auth.private_key_file.as_os_str().is_empty() {
                    config.auth.private_key_file = absolute(&config.auth.private_key_file);
                }
                for webhook in &mut config.webhooks {
                    webhook.secret_file = absolute(&webhook.secret_file);
                }
                if let Some(file) = &mut config.webhook_delivery.ca_file {
                    *file = absolute(file);
                }
                Ok(config)
            }
            _ => Err(ConfigError { problems, read }.located(&sources)),
        }
    }

    /// The `[[webhooks]]`, checked and with their secrets read, for the
    /// delivery engine. The configuration was checked when it was read, so
    /// an error here means a secret file changed since.
    pub fn webhooks(&self) -> Result<Vec<Webhook>, ConfigError> {
        let mut parsed = Vec::new();
        let mut problems = Vec::new();
        for (i, webhook) in self.webhooks.iter().enumerate() {
            match webhook.parse(i, &self.identity_providers) {
                Ok(webhook) => parsed.push(webhook),
                Err(found) => problems.extend(found),
            }
        }
        if problems.is_empty() {
            Ok(parsed)
        } else {
            Err(ConfigError {
                problems,
                read: Vec::new(),
            }
            .located(&self.sources))
        }
    }
}

/// `path` made absolute against the working directory (not resolving links).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The config file read when none is named — `config.toml` in `dir` (the
/// working directory), else `installed` (`/etc/linkid/config.toml`), else
/// none — and what the `read:` line says of it. An installed config this
/// user may not read is a problem, not a reason to carry on without it: the
/// command would use other files than the service.
pub(super) fn unnamed_file(
    dir: &Path,
    installed: &Path,
) -> Result<(Option<PathBuf>, String), Problem> {
    let local = absolute(&dir.join(DEFAULT_CONFIG_PATH));
    let dir = absolute(dir);
    if local.is_file() {
        let what = local.display().to_string();
        return Ok((Some(local), what));
    }
    let readable = match std::fs::metadata(installed) {
        Ok(meta) if meta.is_file() => std::fs::File::open(installed).map(drop),
        Ok(_) => Err(std::io::ErrorKind::NotFound.into()),
        Err(e) => Err(e),
    };
    match readable {
        Ok(()) => Ok((
            Some(installed.to_path_buf()),
            format!(
                "{} (installed; no {DEFAULT_CONFIG_PATH} in {})",
                installed.display(),
                dir.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(Problem::new(
            "",
            format!(
                "there is no {DEFAULT_CONFIG_PATH} in {}, and the installed config {} cannot be read ({e})",
                dir.display(),
                installed.display()
            ),
            "run the command as the linkid user (sudo -u linkid linkid ...), or name a config with --config",
        )),
        Err(_) => Ok((
            None,
            format!(
                "no config file ({DEFAULT_CONFIG_PATH} is not in {}, {} does not exist)",
                dir.display(),
                installed.display()
            ),
        )),
    }
}
