//! Username/password credentials (RFC 1929) from a users file, with hashed passwords.
//!
//! File format: one `username:password` per line; blank lines and lines starting with `#`
//! are ignored; the username may not contain `:`, the password is everything after the first
//! `:`. A password starting with `$argon2` is an Argon2 PHC string, one starting with `$2a$`,
//! `$2b$` or `$2y$` is a bcrypt hash; anything else is the password in clear (accepted, with
//! a warning at load time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use thiserror::Error;

/// Why a users file could not be loaded.
#[derive(Debug, Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read users file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("users file {path}, line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// How one user's password is stored.
#[derive(Clone)]
enum Secret {
    Plain(String),
    Argon2(String),
    Bcrypt(String),
}

/// The users allowed to authenticate.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, Secret>,
    plaintext_users: Vec<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Credentials {
    /// Loads a users file.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a users file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, CredentialsError> {
        let mut creds = Credentials::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let err = |message: &str| CredentialsError::Syntax {
                path: origin.to_owned(),
                line: i + 1,
                message: message.to_owned(),
            };
            let (user, pass) = line
                .split_once(':')
                .ok_or_else(|| err("expected `username:password`"))?;
            if user.is_empty() || user.len() > 255 {
                return Err(err("username must be 1 to 255 bytes"));
            }
            if pass.is_empty() || pass.len() > 255 && !pass.starts_with('$') {
                return Err(err("password must be 1 to 255 bytes"));
            }
            let secret = if pass.starts_with("$argon2") {
                let parsed = PasswordHash::new(pass)
                    .map_err(|e| err(&format!("invalid Argon2 hash: {e}")))?;
                if parsed.hash.is_none() || parsed.salt.is_none() {
                    return Err(err("invalid Argon2 hash: no salt or no hash value"));
                }
                Secret::Argon2(pass.to_owned())
            } else if pass.starts_with("$2a$")
                || pass.starts_with("$2b$")
                || pass.starts_with("$2y$")
            {
                Secret::Bcrypt(pass.to_owned())
            } else {
                creds.plaintext_users.push(user.to_owned());
                Secret::Plain(pass.to_owned())
            };
            if creds.users.insert(user.to_owned(), secret).is_some() {
                return Err(err(&format!("user {user:?} is listed twice")));
            }
        }
        Ok(creds)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file listed no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Users whose password is stored in clear (the caller warns about them).
    pub fn plaintext_users(&self) -> &[String] {
        &self.plaintext_users
    }

    /// Checks a username and password. Slow by design for hashed passwords: call it off the
    /// async executor (`spawn_blocking`).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(Secret::Plain(p)) => constant_time_eq(p.as_bytes(), password.as_bytes()),
            Some(Secret::Argon2(h)) => PasswordHash::new(h)
                .map(|hash| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
                .unwrap_or(false),
            Some(Secret::Bcrypt(h)) => bcrypt::verify(password, h).unwrap_or(false),
            None => {
                // Spend comparable time on unknown users so timing does not reveal which
                // names exist.
                let _ = constant_time_eq(b"msocks-unknown-user", password.as_bytes());
                false
            }
        }
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Hashes a password with Argon2id and a random salt, for `msocks passwd`.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt_bytes = [0u8; 16];
    getrandom::fill(&mut salt_bytes).map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&salt_bytes)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_argon2_and_unknown() {
        let hash = hash_password("s3cret").unwrap();
        let text = format!("# comment\nalice:wonder:land\n\nbob:{hash}\n");
        let c = Credentials::parse(&text, Path::new("users")).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.verify("alice", "wonder:land"));
        assert!(!c.verify("alice", "wonder"));
        assert!(c.verify("bob", "s3cret"));
        assert!(!c.verify("bob", "S3cret"));
        assert!(!c.verify("carol", "s3cret"));
        assert_eq!(c.plaintext_users(), ["alice".to_owned()]);
    }

    #[test]
    fn bcrypt_hash_is_accepted() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let c = Credentials::parse(&format!("u:{h}"), Path::new("users")).unwrap();
        assert!(c.verify("u", "pw"));
        assert!(!c.verify("u", "pW"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = Credentials::parse("ok:1\nnocolon\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Credentials::parse("a:1\na:2\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = Credentials::parse("a:$argon2id$garbage\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("Argon2"), "{e}");
    }
}
