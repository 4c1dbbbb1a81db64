//! Files and folders that hold secrets (the database, the auth log, `auth_dir`): created
//! readable by the owner only, and a warning when an existing one is open to other users.
//! Used by the store and the auth log alike, so neither depends on the other for it.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Warn when an existing file or folder that holds secrets is open to other users.
pub fn warn_if_shared(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "readable by other users; run chmod go-rwx on it"
            );
        }
    }
}

/// Create `dir` and its missing parents readable by the owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_dir_is_owner_only_with_its_missing_parents() {
        let tmp = tempfile::tempdir().expect("a temporary folder");
        let dir = tmp.path().join("a").join("b");
        create_private_dir(&dir).expect("created");
        for d in [tmp.path().join("a"), dir.clone()] {
            let mode = std::fs::metadata(&d).expect("exists").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // An existing folder, and an empty path (a file name without a folder), are left alone.
        create_private_dir(&dir).expect("exists already");
        create_private_dir(Path::new("")).expect("nothing to create");
    }
}
