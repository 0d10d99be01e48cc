//! Configuration files: every setting of every binary is a flag and an environment variable
//! of the same name (`--data-dir` / `CELLMAIL_DATA_DIR`), so a file of `CELLMAIL_*=value`
//! lines is a complete configuration. `--config FILE` (or `CELLMAIL_CONFIG`) loads one
//! before the flags are parsed. Flags win over the environment, and the environment over
//! the file, so one file per cell can be adjusted per run.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFile {
    /// A file of `CELLMAIL_*=value` lines (blank lines and `#` comments allowed).
    #[arg(long = "config", env = "CELLMAIL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: expected CELLMAIL_NAME=value, got {text:?}")]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// The `CELLMAIL_*` settings in `text`, in order.
pub fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut settings = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = || ConfigError::Syntax {
            path: path.to_owned(),
            line: n + 1,
            text: raw.to_owned(),
        };
        let (name, value) = line.split_once('=').ok_or_else(syntax)?;
        let name = name.trim();
        if !name.starts_with("CELLMAIL_")
            || !name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(syntax());
        }
        settings.push((name.to_owned(), value.trim().trim_matches('"').to_owned()));
    }
    Ok(settings)
}

/// Finds `--config FILE` (or `--config=FILE`, or `CELLMAIL_CONFIG`) among this process's
/// arguments and puts the file's settings into the environment where they are not set yet.
/// Call first thing in `main`, before any thread (a runtime's included) is started.
pub fn load_from_args() -> Result<(), ConfigError> {
    let args: Vec<String> = std::env::args().collect();
    let from_flag =
        args.iter()
            .enumerate()
            .find_map(|(i, arg)| match arg.strip_prefix("--config") {
                Some("") => args.get(i + 1).cloned(),
                Some(rest) => rest.strip_prefix('=').map(str::to_owned),
                None => None,
            });
    let Some(path) = from_flag
        .or_else(|| std::env::var("CELLMAIL_CONFIG").ok())
        .map(PathBuf::from)
    else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    for (name, value) in parse(&path, &text)? {
        if std::env::var_os(&name).is_none() {
            // SAFETY: called at start-up, before any other thread exists to read the environment.
            unsafe { std::env::set_var(name, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_and_bad_lines_are_named() {
        let path = Path::new("cell.env");
        let text =
            "# cell-2, eu-west-1\nCELLMAIL_CELL_ID=cell-2\n\nCELLMAIL_AWS_REGION = \"eu-west-1\"\n";
        let settings = parse(path, text).unwrap();
        assert_eq!(
            settings,
            [
                ("CELLMAIL_CELL_ID".into(), "cell-2".into()),
                ("CELLMAIL_AWS_REGION".into(), "eu-west-1".into())
            ]
        );
        match parse(path, "CELLMAIL_QUEUE=sqs\nPATH=/tmp\n") {
            Err(ConfigError::Syntax { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(path, "just words"),
            Err(ConfigError::Syntax { line: 1, .. })
        ));
    }
}
