//! The state file: `<data_dir>/state.json`, replaced atomically.
//!
//! A write goes to `state.json.tmp`, is fsynced, renamed over `state.json`, and the directory is
//! fsynced, so after a crash the file holds either the old state or the new one, never a mix.
//! A read validates the whole state ([`State::check`]); a file that does not parse or does not
//! validate is an [`Error::Corrupt`], never silently replaced by an empty state.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Corruption, Error};
use crate::state::State;

/// The name of the state file inside the data directory.
pub const STATE_FILE: &str = "state.json";
const TEMP_FILE: &str = "state.json.tmp";

/// The path of the state file in `data_dir`.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FILE)
}

/// Loads the state from `data_dir`, creating the directory if needed. A missing state file is a
/// fresh config manager (the empty state); a leftover temp file from a crashed write is removed.
pub fn load(data_dir: &Path) -> Result<State, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let temp = data_dir.join(TEMP_FILE);
    match fs::remove_file(&temp) {
        Ok(()) => {
            tracing::warn!(path = %temp.display(), "removed the temp file of an unfinished write")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&temp)(e)),
    }
    let path = state_path(data_dir);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(io(&path)(e)),
    };
    let corrupt = |source| Error::Corrupt {
        path: path.clone(),
        source,
    };
    let state: State = serde_json::from_slice(&bytes).map_err(|e| corrupt(Corruption::Json(e)))?;
    state.check().map_err(corrupt)?;
    Ok(state)
}

/// Writes `state` to `data_dir` atomically and durably. The state must be consistent: writing an
/// inconsistent state is a bug, so it panics (paired with the check in [`load`]).
pub fn store(data_dir: &Path, state: &State) -> Result<(), Error> {
    if let Err(e) = state.check() {
        panic!("refusing to write an inconsistent config-manager state: {e}");
    }
    let bytes = serde_json::to_vec_pretty(state).expect("the state serializes to JSON");
    let temp = data_dir.join(TEMP_FILE);
    let path = state_path(data_dir);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut file = File::create(&temp).map_err(io(&temp))?;
    file.write_all(&bytes).map_err(io(&temp))?;
    file.sync_all().map_err(io(&temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io(&path))?;
    File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io(data_dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use causeway_core::{NodeId, NodeInfo};

    use super::*;

    #[test]
    fn a_stored_state_loads_back_and_garbage_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), State::default());
        let nodes = [NodeInfo {
            id: NodeId(1),
            addr: "127.0.0.1:1".into(),
        }];
        let s = State::default().bootstrap(1, 1, &nodes).unwrap();
        store(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()).unwrap(), s);

        fs::write(state_path(dir.path()), b"{\"format_version\": 1, \"rev").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    source: Corruption::Json(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
