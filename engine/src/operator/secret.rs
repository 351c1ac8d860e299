//! The secret that signs login tokens. When the operator gives none, one is generated on the
//! first start and kept in the data directory (mode 0600), so tokens stay valid across restarts.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const FILE_NAME: &str = "jwt-secret";

/// Returns the configured secret, or the one stored in `data_dir`, generating it if needed.
pub fn jwt_secret(configured: Option<&str>, data_dir: &Path) -> io::Result<String> {
    if let Some(secret) = configured {
        return Ok(secret.to_string());
    }
    fs::create_dir_all(data_dir)?;
    let path = data_dir.join(FILE_NAME);
    match fs::read_to_string(&path) {
        Ok(secret) => return Ok(secret.trim().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut random = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();
    // create_new: two nodes started on one directory at once must not both write it.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    tracing::info!(
        path = %path.display(),
        "generated a JWT secret; mint a token with: chinwag token --secret \"$(cat {})\" --uid buyer:1",
        path.display()
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
        let first = jwt_secret(None, dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        let mode = fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(jwt_secret(None, dir.path()).unwrap(), first);
        assert_eq!(jwt_secret(Some("given"), dir.path()).unwrap(), "given");
    }
}
