//! Test support: a freshly manufactured software TPM (swtpm with EK and platform certificates)
//! started on a free 127.0.0.1 port for one test and stopped when dropped. It drives the
//! `swtpm/manufacture`, `swtpm/start` and `swtpm/stop` scripts of this repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running swtpm in its own temporary directory.
pub struct SwTpm {
    dir: tempfile::TempDir,
    /// TCTI string, e.g. `swtpm:host=127.0.0.1,port=12345`.
    pub tcti: String,
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../swtpm")
}

fn run(cmd: &mut Command, what: &str) -> std::io::Result<Output> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

impl SwTpm {
    /// Manufactures (EK certificates, platform certificate, sha256+sha384 banks) and starts a TPM.
    pub fn start() -> std::io::Result<SwTpm> {
        let dir = tempfile::Builder::new().prefix("kame-swtpm-").tempdir()?;
        run(
            Command::new(scripts().join("manufacture")).arg(dir.path()),
            "swtpm/manufacture",
        )?;
        let out = run(
            Command::new(scripts().join("start")).arg(dir.path()),
            "swtpm/start",
        )?;
        let tcti = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(SwTpm { dir, tcti })
    }

    /// Power-cycles the TPM (stop, start on the same state: a TPM Reset, so resetCount grows
    /// and PCRs are cleared); the TCTI changes with the new port.
    pub fn restart(&mut self) -> std::io::Result<()> {
        run(
            Command::new(scripts().join("stop")).arg(self.dir.path()),
            "swtpm/stop",
        )?;
        let out = run(
            Command::new(scripts().join("start")).arg(self.dir.path()),
            "swtpm/start",
        )?;
        self.tcti = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(())
    }

    /// The directory with the TPM state and the EK CA certificates
    /// (`ek-root-ca.pem`, `ek-intermediate-ca.pem`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a tpm2-tools command against this TPM (working directory: the TPM's directory),
    /// then flushes transient objects: swtpm has no resource manager and only three transient
    /// slots, and tpm2-tools keeps objects in files as saved contexts.
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        let out = self.raw_tpm2(tool, args);
        if tool != "tpm2_flushcontext" {
            let _ = self.raw_tpm2("tpm2_flushcontext", &["-t"]);
        }
        out
    }

    /// Runs a tpm2-tools command without flushing transient objects afterwards.
    pub fn raw(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        self.raw_tpm2(tool, args)
    }

    fn raw_tpm2(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        run(
            Command::new(tool)
                .args(args)
                .current_dir(self.dir.path())
                .env("TPM2TOOLS_TCTI", &self.tcti)
                .env("TSS2_LOG", "all+NONE"),
            tool,
        )
    }

    /// Reads a file from the TPM's directory.
    pub fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.path().join(name))
    }

    pub fn write(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        std::fs::write(self.dir.path().join(name), data)
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        let _ = Command::new(scripts().join("stop"))
            .arg(self.dir.path())
            .output();
    }
}
