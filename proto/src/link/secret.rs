//! A shared secret read from a file (the cluster secret, the admin token), which rotates
//! without a restart.
//!
//! Every line of the file is accepted, and the first is the one sent. The file is looked at
//! again when a second has passed since the last look, on use (by one caller; the others go on
//! with the values in use), and a change is taken once two looks in a row read the same text, so
//! that a file caught halfway through a write is not. A rotation is: add the new secret as a
//! second line on every process, then move it first everywhere, then remove the old line. A
//! file that becomes unreadable or invalid keeps the secrets in use (and says so in the log).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};

use super::LinkError;

/// The shortest secret or admin token accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// How often the file is looked at again, at most.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// One secret, and the file it is read from.
#[derive(Clone)]
pub(crate) struct Secret(Arc<Inner>);

impl std::fmt::Debug for Secret {
    /// Never the values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("path", &self.0.path)
            .finish()
    }
}

struct Inner {
    /// `None` for a secret built in code: it never changes.
    path: Option<PathBuf>,
    state: RwLock<Arc<State>>,
    look: Mutex<Look>,
}

/// The values in use.
struct State {
    /// The file's text they come from.
    text: String,
    /// Every value accepted; the first is sent.
    accepted: Vec<String>,
    sent: MetadataValue<Ascii>,
}

/// The last look at the file.
struct Look {
    at: Instant,
    /// A text unlike the one in use, read once: taken when the next look reads it again.
    seen: Option<String>,
}

impl Secret {
    /// The secret of `path`.
    pub(crate) fn load(path: &Path) -> Result<Secret, LinkError> {
        let text = read(path)?;
        let state = State::parse(text).map_err(|why| invalid(path, &why))?;
        Ok(Secret::new(Some(path.to_owned()), state))
    }

    /// A secret built in code (`causeway dev`, tests), that is not read again.
    pub(crate) fn fixed(value: &str) -> Secret {
        let state = State {
            text: value.to_owned(),
            accepted: vec![value.to_owned()],
            // A value that is no valid header is sent empty, and matches nothing.
            sent: value
                .parse()
                .unwrap_or_else(|_| MetadataValue::from_static("")),
        };
        Secret::new(None, state)
    }

    fn new(path: Option<PathBuf>, state: State) -> Secret {
        Secret(Arc::new(Inner {
            path,
            state: RwLock::new(Arc::new(state)),
            look: Mutex::new(Look {
                at: Instant::now(),
                seen: None,
            }),
        }))
    }

    /// The value to send.
    pub(crate) fn sent(&self) -> MetadataValue<Ascii> {
        self.current().sent.clone()
    }

    /// Whether `presented` is one of the accepted values, compared in constant time.
    pub(crate) fn accepts(&self, presented: &str) -> bool {
        self.current().accepted.iter().fold(false, |any, value| {
            any | bool::from(value.as_bytes().ct_eq(presented.as_bytes()))
        })
    }

    /// The values in use, after a look at the file when one is due and no other caller is
    /// looking.
    fn current(&self) -> Arc<State> {
        if let Some(path) = &self.0.path {
            if let Ok(mut look) = self.0.look.try_lock() {
                if look.at.elapsed() >= RELOAD_EVERY {
                    look.at = Instant::now();
                    self.look_at(path, &mut look);
                }
            }
        }
        Arc::clone(&self.0.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn look_at(&self, path: &Path, look: &mut Look) {
        let text = match read(path) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!("{e}; keeping the secrets in use");
                return;
            }
        };
        let in_use = Arc::clone(&self.0.state.read().unwrap_or_else(|e| e.into_inner()));
        if text == in_use.text {
            look.seen = None;
            return;
        }
        if look.seen.as_ref() != Some(&text) {
            // Maybe halfway through a write: taken if the next look reads the same.
            look.seen = Some(text);
            return;
        }
        look.seen = None;
        match State::parse(text) {
            Ok(new) => {
                tracing::info!(path = %path.display(), "a secret file changed; using it");
                *self.0.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
            }
            Err(why) => tracing::warn!(path = %path.display(), "{why}; keeping the secrets in use"),
        }
    }
}

impl State {
    fn parse(text: String) -> Result<State, String> {
        let accepted: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let valid =
            |s: &String| s.len() >= MIN_SECRET_BYTES && s.bytes().all(|b| b.is_ascii_graphic());
        if accepted.is_empty() || !accepted.iter().all(valid) {
            return Err(format!(
                "it must hold lines of at least {MIN_SECRET_BYTES} printable ASCII characters \
                 (the first is sent, every one is accepted)"
            ));
        }
        let sent = accepted[0]
            .parse()
            .map_err(|_| "its first line is not a valid header value".to_owned())?;
        Ok(State {
            text,
            accepted,
            sent,
        })
    }
}

fn read(path: &Path) -> Result<String, LinkError> {
    String::from_utf8(super::read(path)?).map_err(|_| invalid(path, "it is not UTF-8"))
}

fn invalid(path: &Path, why: &str) -> LinkError {
    LinkError::Invalid(format!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_rotates_without_a_restart_and_a_bad_one_keeps_the_secrets() {
        let (old, new) = ("o".repeat(32), "n".repeat(32));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        // Waits for two looks at the file (a change is taken at the second), then answers
        // (sent, accepts old, accepts new).
        let after_reload = |s: &Secret| {
            for _ in 0..2 {
                std::thread::sleep(RELOAD_EVERY + Duration::from_millis(50));
                s.sent();
            }
            let sent = s.sent().to_str().unwrap().to_owned();
            (sent, s.accepts(&old), s.accepts(&new))
        };
        write(&format!("{old}\n"));
        let s = Secret::load(&path).unwrap();
        assert!(s.accepts(&old) && !s.accepts(&new) && !s.accepts(""));
        // A change read once (a write caught halfway) is not taken yet.
        write(&format!("{new}\n"));
        std::thread::sleep(RELOAD_EVERY + Duration::from_millis(50));
        assert!(s.accepts(&old) && !s.accepts(&new));
        // The new secret as a second line: accepted, not yet sent.
        write(&format!("{old}\n{new}\n"));
        assert_eq!(after_reload(&s), (old.clone(), true, true));
        // Moved first: sent.
        write(&format!("{new}\n{old}\n"));
        assert_eq!(after_reload(&s), (new.clone(), true, true));
        // The old one removed: refused.
        write(&new);
        assert_eq!(after_reload(&s), (new.clone(), false, true));
        // A bad file, then a missing one: the secret in use stays.
        write("short");
        assert_eq!(after_reload(&s), (new.clone(), false, true));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(after_reload(&s), (new.clone(), false, true));
        // A bad file does not load at all.
        write(&format!("{new}\nshort\n"));
        assert!(Secret::load(&path).is_err());
    }
}
