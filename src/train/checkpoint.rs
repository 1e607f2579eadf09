//! Checkpoints committed as a set, verified on load.
//!
//! A run folder holds its checkpoint in `ckpt/`: `model.bpk`, `optim.bpk` and `state.json`, the
//! last naming the other two files' sizes and checksums. A save writes the three files into
//! `ckpt.new/`, syncs them and the folder, then renames `ckpt/` to `ckpt.old/`, `ckpt.new/` to
//! `ckpt/`, and removes `ckpt.old/`. At every instant one complete set exists: whatever a kill
//! or a full disk interrupts, [`find`] returns the newest set whose files match their checksums
//! (`ckpt`, else a finished `ckpt.new`, else `ckpt.old`), and the next save clears the rest.
//! Folders written before this layout (the three files directly in the run folder) still load.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files of one checkpoint set.
pub struct CkptPaths {
    pub dir: PathBuf,
    pub model: PathBuf,
    pub optim: PathBuf,
    pub state: PathBuf,
}

pub fn ckpt_paths(dir: &Path) -> CkptPaths {
    CkptPaths {
        dir: dir.to_path_buf(),
        model: dir.join("model.bpk"),
        optim: dir.join("optim.bpk"),
        state: dir.join("state.json"),
    }
}

const CURRENT: &str = "ckpt";
const NEW: &str = "ckpt.new";
const OLD: &str = "ckpt.old";

/// FNV-1a, 64 bits: enough to catch flipped bytes and truncation (not an adversary).
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn io(what: &str, p: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{what} {}: {e}", p.display()))
}

fn file_entry(p: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(p).map_err(|e| io("reading", p, e))?;
    Ok(serde_json::json!({"bytes": bytes.len(), "fnv1a64": format!("{:016x}", checksum(&bytes))}))
}

/// The state of a set whose model and optimizer files match the sizes and checksums its
/// `state.json` names; an error that says what does not match otherwise.
pub fn verify(set: &CkptPaths) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(&set.state).map_err(|e| io("reading", &set.state, e))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io("parsing", &set.state, e))?;
    let files = &state["files"];
    if files.is_null() {
        // A folder from before checksums: nothing to compare.
        return Ok(state);
    }
    for (name, p) in [("model.bpk", &set.model), ("optim.bpk", &set.optim)] {
        let want = &files[name];
        let got = file_entry(p)?;
        if *want != got {
            return Err(Error::InvalidInput(format!(
                "{} does not match its checkpoint record (recorded {want}, found {got}): the \
                 file was changed or cut short",
                p.display()
            )));
        }
    }
    Ok(state)
}

/// The newest complete, verified checkpoint set in a run folder, with its state; `None` where
/// the folder holds none. A set that exists but fails its checks is an error when no other
/// complete set is left (the message names what failed).
pub fn find(run: &Path) -> Result<Option<(CkptPaths, serde_json::Value)>> {
    let mut failure = None;
    for name in [CURRENT, NEW, OLD] {
        let set = ckpt_paths(&run.join(name));
        if !set.state.exists() {
            continue;
        }
        match verify(&set) {
            Ok(state) => return Ok(Some((set, state))),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let legacy = ckpt_paths(run);
    if legacy.state.exists() {
        return verify(&legacy).map(|s| Some((legacy, s)));
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

fn sync_dir(p: &Path) {
    // Directory fsync makes the renames durable; not every platform allows opening one.
    if let Ok(d) = std::fs::File::open(p) {
        let _ = d.sync_all();
    }
}

fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("syncing", p, e))
}

/// Commit a checkpoint: `write` fills the set it is given with `model.bpk` and `optim.bpk`;
/// `state` (without `files`) is completed with their checksums and written last. The previous
/// set stays until the new one is complete.
pub fn commit(
    run: &Path,
    write: impl FnOnce(&CkptPaths) -> Result<()>,
    mut state: serde_json::Value,
) -> Result<()> {
    let new = ckpt_paths(&run.join(NEW));
    let (cur, old) = (run.join(CURRENT), run.join(OLD));
    if new.dir.exists() {
        if !cur.exists() && verify(&new).is_ok() {
            // A save interrupted between its renames: finish it, so that the newest complete
            // set is the current one while this save writes.
            std::fs::rename(&new.dir, &cur).map_err(|e| io("renaming", &new.dir, e))?;
        } else {
            // A half-written set: the current one (or the old one) is the good one.
            std::fs::remove_dir_all(&new.dir).map_err(|e| io("removing", &new.dir, e))?;
        }
    }
    std::fs::create_dir_all(&new.dir).map_err(|e| io("creating", &new.dir, e))?;
    write(&new)?;
    sync_file(&new.model)?;
    sync_file(&new.optim)?;
    state["files"] = serde_json::json!({
        "model.bpk": file_entry(&new.model)?,
        "optim.bpk": file_entry(&new.optim)?,
    });
    crate::files::write_atomic(
        &new.state,
        serde_json::to_string_pretty(&state).unwrap().as_bytes(),
    )?;
    sync_dir(&new.dir);
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io("removing", &old, e))?;
    }
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(|e| io("renaming", &cur, e))?;
    }
    std::fs::rename(&new.dir, &cur).map_err(|e| io("renaming", &new.dir, e))?;
    sync_dir(run);
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io("removing", &old, e))?;
    }
    // A folder of the old layout is superseded by the committed set.
    for p in [
        ckpt_paths(run).model,
        ckpt_paths(run).optim,
        ckpt_paths(run).state,
    ] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("sparse-attn-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn save(run: &Path, step: u64) {
        commit(
            run,
            |set| {
                std::fs::write(&set.model, format!("model at {step}")).unwrap();
                std::fs::write(&set.optim, format!("optim at {step}")).unwrap();
                Ok(())
            },
            serde_json::json!({"step": step}),
        )
        .unwrap();
    }

    fn step_of(run: &Path) -> u64 {
        find(run).unwrap().unwrap().1["step"].as_u64().unwrap()
    }

    #[test]
    fn every_interrupted_save_leaves_a_complete_set() {
        let run = run_dir("interrupt");
        assert!(find(&run).unwrap().is_none());
        save(&run, 1);
        save(&run, 2);
        assert_eq!(step_of(&run), 2);
        // Killed while writing the new set: the current one stands.
        std::fs::create_dir_all(run.join(NEW)).unwrap();
        std::fs::write(run.join(NEW).join("model.bpk"), "half").unwrap();
        assert_eq!(step_of(&run), 2);
        // Killed between the two renames: the finished new set is found, then the old one.
        save(&run, 3);
        std::fs::rename(run.join(CURRENT), run.join(OLD)).unwrap();
        save_new_only(&run, 4);
        assert_eq!(step_of(&run), 4);
        std::fs::remove_dir_all(run.join(NEW)).unwrap();
        assert_eq!(step_of(&run), 3);
        // The next save clears the leftovers.
        save(&run, 5);
        assert_eq!(step_of(&run), 5);
        assert!(!run.join(NEW).exists() && !run.join(OLD).exists());
        let _ = std::fs::remove_dir_all(&run);
    }

    fn save_new_only(run: &Path, step: u64) {
        let new = ckpt_paths(&run.join(NEW));
        std::fs::create_dir_all(&new.dir).unwrap();
        std::fs::write(&new.model, format!("model at {step}")).unwrap();
        std::fs::write(&new.optim, format!("optim at {step}")).unwrap();
        let state = serde_json::json!({"step": step, "files": {
            "model.bpk": file_entry(&new.model).unwrap(),
            "optim.bpk": file_entry(&new.optim).unwrap(),
        }});
        std::fs::write(&new.state, state.to_string()).unwrap();
    }

    #[test]
    fn flipped_or_cut_files_are_found_out() {
        let run = run_dir("flip");
        save(&run, 7);
        let model = run.join(CURRENT).join("model.bpk");
        let mut bytes = std::fs::read(&model).unwrap();
        bytes[3] ^= 0x20;
        std::fs::write(&model, &bytes).unwrap();
        let e = find(&run)
            .err()
            .expect("a flipped byte must not load")
            .to_string();
        assert!(e.contains("does not match its checkpoint record"), "{e}");
        std::fs::write(&model, &bytes[..4]).unwrap();
        assert!(find(&run).is_err());
        let _ = std::fs::remove_dir_all(&run);
    }
}
