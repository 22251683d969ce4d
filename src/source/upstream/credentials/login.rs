//! The proxy's etcd user as configured: `--user NAME[:PASSWORD]`, `--password`,
//! `--password-file` (etcdctl's rules). The password is held as a [`Secret`], which keeps it
//! out of every log and `Debug` output.

use std::path::PathBuf;

use crate::config::{Config, Secret};

/// Where the password comes from.
#[derive(Debug, Clone)]
enum Password {
    /// Given on the command line or in the environment.
    Inline(Secret),
    /// Read from this file at every login (a mounted Secret may be rotated).
    File(PathBuf),
}

/// The user the proxy logs in as.
#[derive(Debug, Clone)]
pub struct Login {
    /// etcd user name.
    pub(super) user: String,
    /// Its password.
    password: Password,
}

impl Login {
    /// The login configured by `--user`, `--password` and `--password-file` (etcdctl's rules:
    /// `--user NAME:PASSWORD` unless a password is given separately, then `--user` is the name
    /// as is). `None` when no user is configured. The password file must be readable now.
    pub fn from_config(config: &Config) -> Result<Option<Login>, String> {
        let login = match (&config.user, &config.password, &config.password_file) {
            (None, None, None) => return Ok(None),
            (None, _, _) => return Err("--password and --password-file need --user".into()),
            (Some(user), Some(p), _) => Login {
                user: user.expose().to_string(),
                password: Password::Inline(p.clone()),
            },
            (Some(user), None, Some(path)) => Login {
                user: user.expose().to_string(),
                password: Password::File(path.clone()),
            },
            (Some(user), None, None) => match user.expose().split_once(':') {
                Some((name, password)) => Login {
                    user: name.to_string(),
                    password: Password::Inline(Secret::new(password.to_string())),
                },
                None => {
                    return Err(format!(
                        "--user {} has no password: use --user NAME:PASSWORD, --password or --password-file",
                        user.expose()
                    ))
                }
            },
        };
        if login.user.is_empty() {
            return Err("--user: empty user name".into());
        }
        login.password()?;
        Ok(Some(login))
    }

    /// The password as of now (a file is read again, trailing newlines trimmed).
    pub(super) fn password(&self) -> Result<Secret, String> {
        match &self.password {
            Password::Inline(p) => Ok(p.clone()),
            Password::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("--password-file {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::upstream::credentials::Credentials;
    use clap::Parser;
    use std::time::Duration;

    fn login(args: &[&str]) -> Result<Option<Login>, String> {
        let mut argv = vec!["etcd-fanout"];
        argv.extend_from_slice(args);
        Login::from_config(&Config::parse_from(argv))
    }

    fn parts(l: Option<Login>) -> Option<(String, String)> {
        let l = l?;
        let p = l.password().ok()?;
        Some((l.user, p.expose().to_string()))
    }

    #[test]
    fn flags_follow_etcdctl() {
        assert!(login(&[]).unwrap().is_none());
        assert_eq!(
            parts(login(&["--user", "fanout:s3:cr"]).unwrap()),
            Some(("fanout".into(), "s3:cr".into()))
        );
        assert_eq!(
            parts(login(&["--user", "a:b", "--password", "pw"]).unwrap()),
            Some(("a:b".into(), "pw".into()))
        );
        assert!(login(&["--user", "fanout"]).is_err());
        assert!(login(&["--password", "pw"]).is_err());
        assert!(login(&["--user", ":pw"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from file\n").unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(
            parts(login(&["--user", "fanout", "--password-file", f]).unwrap()),
            Some(("fanout".into(), "from file".into()))
        );
        assert!(login(&["--user", "fanout", "--password-file", "/nonexistent/pw"]).is_err());
    }

    #[test]
    fn password_is_never_shown() {
        let l = login(&["--user", "fanout:hunter2"]).unwrap();
        assert!(!format!("{l:?}").contains("hunter2"));
        let c = Credentials::new(l, Duration::from_secs(300));
        assert!(!format!("{c:?}").contains("hunter2"));
        for args in [
            ["etcd-fanout", "--user", "u", "--password", "hunter2"].as_slice(),
            ["etcd-fanout", "--user", "u:hunter2"].as_slice(),
        ] {
            let config = Config::parse_from(args);
            assert!(!format!("{config:?}").contains("hunter2"));
        }
    }
}
