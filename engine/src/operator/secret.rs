//! The secret that signs login tokens. It comes from the operator (`--jwt-secret`,
//! `CHINWAG_JWT_SECRET` or `--jwt-secret-file`), or, when none is given, is generated on the
//! first start and kept in the data directory (mode 0600), so tokens stay valid across restarts.
//!
//! Whatever its source, a secret shorter than [`SECRET_BYTES_MIN`] is refused: with an empty
//! or guessable key anyone can sign a token for anyone.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The shortest secret accepted: RFC 7518 §3.2 asks HS256 keys of at least 256 bits.
pub const SECRET_BYTES_MIN: usize = 32;

const FILE_NAME: &str = "jwt-secret";

/// Refuses a secret shorter than [`SECRET_BYTES_MIN`], saying where it came from and how to
/// make a good one.
pub fn check(secret: &str, source: &str) -> Result<(), String> {
    if secret.len() >= SECRET_BYTES_MIN {
        return Ok(());
    }
    Err(format!(
        "the JWT secret from {source} is {} bytes; at least {SECRET_BYTES_MIN} are needed \
         (RFC 7518 §3.2). Make one with `openssl rand -hex 32`, or give none and one is \
         generated into the data directory",
        secret.len()
    ))
}

/// Reads a secret from `path` (surrounding whitespace, e.g. a final newline, is not part of it).
pub fn read_file(path: &Path) -> Result<String, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("cannot read the JWT secret file {}: {e}", path.display()))?;
    let secret = text.trim().to_string();
    check(&secret, &path.display().to_string())?;
    Ok(secret)
}

/// The secret kept in `data_dir`, without creating it (for offline tools such as `chinwag
/// token --data-dir`).
pub fn read_stored(data_dir: &Path) -> Result<String, String> {
    read_file(&data_dir.join(FILE_NAME))
}

/// Returns the configured secret (`given`, else the contents of `file`), or the one stored in
/// `data_dir`, generating it if needed. Errors are sentences for the operator.
pub fn jwt_secret(
    given: Option<&str>,
    file: Option<&Path>,
    data_dir: &Path,
) -> Result<String, String> {
    if let Some(secret) = given {
        check(secret, "--jwt-secret (or CHINWAG_JWT_SECRET)")?;
        return Ok(secret.to_string());
    }
    if let Some(path) = file {
        return read_file(path);
    }
    let path = data_dir.join(FILE_NAME);
    if path.exists() {
        return read_file(&path);
    }
    generate(&path).map_err(|e| format!("cannot generate {}: {e}", path.display()))
}

fn generate(path: &Path) -> io::Result<String> {
    let mut random = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();
    // create_new: never overwrite a secret that tokens were minted with.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    tracing::info!(
        path = %path.display(),
        "generated a JWT secret; mint a token with: chinwag token --data-dir {} --uid buyer:1",
        path.parent().map_or(".".into(), |p| p.display().to_string())
    );
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let first = jwt_secret(None, None, dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let mode = fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(jwt_secret(None, None, dir.path()).unwrap(), first);
        assert_eq!(read_stored(dir.path()).unwrap(), first);
        let given = "g".repeat(SECRET_BYTES_MIN);
        assert_eq!(jwt_secret(Some(&given), None, dir.path()).unwrap(), given);
    }

    #[test]
    fn refuses_secrets_shorter_than_32_bytes_from_every_source() {
        let dir = tempfile::tempdir().unwrap();
        for short in ["", "x", &"y".repeat(SECRET_BYTES_MIN - 1)] {
            let err = jwt_secret(Some(short), None, dir.path()).unwrap_err();
            assert!(err.contains("openssl rand"), "{err}");
            let file = dir.path().join("given");
            fs::write(&file, format!("{short}\n")).unwrap();
            assert!(jwt_secret(None, Some(&file), dir.path()).is_err());
            // A stored secret (e.g. written by hand) is checked too.
            let stored = tempfile::tempdir().unwrap();
            fs::write(stored.path().join(FILE_NAME), short).unwrap();
            assert!(jwt_secret(None, None, stored.path()).is_err());
            assert!(read_stored(stored.path()).is_err());
        }
        let file = dir.path().join("good");
        fs::write(&file, format!("{}\n", "z".repeat(SECRET_BYTES_MIN))).unwrap();
        assert_eq!(
            jwt_secret(None, Some(&file), dir.path()).unwrap(),
            "z".repeat(SECRET_BYTES_MIN)
        );
    }
}
