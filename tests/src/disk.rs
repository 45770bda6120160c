//! Disk faults of a store node of a [`LocalCluster`](crate::LocalCluster): its data directory on
//! a tmpfs of its own, small enough to fill (`ClusterSpec::node_disk_mb`), and fsync failures
//! through libfiu (`ClusterSpec::fsync_faults`: the node runs under `fiu-run -x`, from Debian's
//! fiu-utils, and `fiu-ctrl` turns `posix/io/sync/*` on and off in it: `fsync`, `fdatasync` and
//! the like fail with EIO).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The ballast file that fills a disk.
const BALLAST: &str = "ballast";

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A tmpfs of `mb` MiB mounted on `dir` (created if missing); unmounted on drop.
#[derive(Debug)]
pub(crate) struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    pub(crate) fn mount(dir: &Path, mb: u64) -> Result<SmallDisk> {
        std::fs::create_dir_all(dir)?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mb}m,mode=0700"))
            .arg("causeway-test")
            .arg(dir))
        .context("mounting a tmpfs (the disk tests need root)")?;
        Ok(SmallDisk {
            dir: dir.to_path_buf(),
        })
    }

    /// Writes a ballast file until the disk has no space left.
    pub(crate) fn fill(&self) -> Result<()> {
        let mut file = std::fs::File::create(self.dir.join(BALLAST))?;
        let chunk = vec![0u8; 1 << 20];
        // Bounded by the size of the disk; a write that fails is the disk full.
        loop {
            if let Err(e) = file.write_all(&chunk) {
                if e.raw_os_error() == Some(libc_enospc()) {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
    }

    /// Removes the ballast.
    pub(crate) fn free(&self) -> Result<()> {
        match std::fs::remove_file(self.dir.join(BALLAST)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// ENOSPC on Linux.
fn libc_enospc() -> i32 {
    28
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The control pipes' base name of the processes run under `fiu-run` by this test process.
pub(crate) fn fiu_control(root: &Path) -> PathBuf {
    root.join("fiu-ctrl")
}

/// `fiu-run -x -f CONTROL program`: the program with libfiu's POSIX wrappers preloaded and
/// remote control on `CONTROL-<pid>.{in,out}`.
pub(crate) fn under_fiu(program: &Path, control: &Path) -> Command {
    let mut command = Command::new("fiu-run");
    command.arg("-x").arg("-f").arg(control).arg(program);
    command
}

/// Makes every sync call of process `pid` (run [`under_fiu`]) fail with EIO, or succeed again.
/// `fiu-ctrl` exits 0 even when the process refused the command or is gone (it says so on its
/// output), and blocks on the control pipe of a process that exited: it runs under `timeout`,
/// and its output is read.
pub(crate) fn fail_syncs(control: &Path, pid: u32, fail: bool) -> Result<()> {
    let what = if fail {
        "enable name=posix/io/sync/*,failinfo=5"
    } else {
        "disable name=posix/io/sync/*"
    };
    let output = Command::new("timeout")
        .arg("5")
        .arg("fiu-ctrl")
        .arg("-f")
        .arg(control)
        .arg("-c")
        .arg(what)
        .arg(pid.to_string())
        .output()
        .context("fiu-ctrl (Debian's fiu-utils)")?;
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || said.to_ascii_lowercase().contains("error") {
        bail!(
            "fiu-ctrl -c '{what}' {pid}: {} {}",
            output.status,
            said.trim()
        );
    }
    Ok(())
}
