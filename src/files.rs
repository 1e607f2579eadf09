//! Output files that are checked before the work and never left half-written.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::InvalidInput(format!("{what} {}: {e}", path.display()))
}

/// A folder that will receive outputs: created if missing (its parent must exist) and probed
/// for writing, so that a run fails before its work instead of after it.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = parent
            && !p.is_dir()
        {
            return Err(Error::InvalidInput(format!(
                "cannot create {}: its parent folder {} does not exist",
                dir.display(),
                p.display()
            )));
        }
        std::fs::create_dir(dir).map_err(|e| io_err("cannot create", dir, e))?;
    } else if !dir.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{} exists and is not a folder",
            dir.display()
        )));
    }
    let probe = dir.join(format!(".sparse-attn-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| io_err("cannot write into", dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A file that will be written at the end of a run: its folder is prepared ([`prepare_dir`])
/// and an existing path must be a plain file. Nothing is written to `path` itself yet.
pub fn prepare_file(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err(Error::InvalidInput(format!(
            "`{}` is not a file path",
            path.display()
        )));
    }
    if path.exists() && !path.is_file() {
        return Err(Error::InvalidInput(format!(
            "{} exists and is not a plain file",
            path.display()
        )));
    }
    prepare_dir(&folder_of(path))
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Write `bytes` to `path` all or nothing: into a temporary file beside it, flushed to disk,
/// then renamed over `path` (a crash or a full disk leaves the old file, never a partial one).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("`{}` is not a file path", path.display())))?;
    let tmp = folder_of(path).join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot write", path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("sparse-attn-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn outputs_are_checked_and_written_whole() {
        let d = scratch("a");
        // A missing folder whose parent exists is created; a deeper one is refused.
        prepare_file(&d.join("new/out.json")).unwrap();
        assert!(d.join("new").is_dir());
        let e = prepare_file(&d.join("no/such/out.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        // A folder where a file is expected, and a file where a folder is expected.
        let e = prepare_file(&d.join("new")).unwrap_err().to_string();
        assert!(e.contains("not a plain file"), "{e}");
        std::fs::write(d.join("f"), b"x").unwrap();
        let e = prepare_dir(&d.join("f")).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
        // Written whole, replacing the old content; no temporary file left behind.
        let p = d.join("new/out.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let left: Vec<_> = std::fs::read_dir(d.join("new")).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // A failed write leaves the old file as it was.
        assert!(write_atomic(&d.join("missing/out.json"), b"x").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
