//! A private CA and a server certificate for 127.0.0.1 and localhost, made
//! with the `openssl` command in a temporary directory, for TLS test servers.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::redis_server::TlsFiles;

/// A CA and a server certificate it signed; the files go with it.
pub struct Certificates {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("openssl not found on PATH: apt-get install openssl")
        }
        Err(e) => panic!("cannot run openssl: {e}"),
    };
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl Certificates {
    /// A fresh CA (`ca.pem`) and a server certificate (`server.pem`, key
    /// `server.key`) for `IP:127.0.0.1` and `DNS:localhost`, valid for a day.
    #[allow(clippy::new_without_default)] // each call makes new keys: not a default value
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let at = dir.path();
        let day = ["-days", "1"];
        let ca = ["-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem"];
        openssl(at, &[&["req"][..], &ca, &day, &["-subj", "/CN=switchboard test CA"]].concat());
        let request = ["-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr"];
        openssl(at, &[&["req"][..], &request, &["-subj", "/CN=localhost"]].concat());
        std::fs::write(
            at.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        let sign = ["-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
        openssl(at, &[&["x509"][..], &sign, &day, &["-extfile", "server.ext", "-out", "server.pem"]].concat());
        Self { dir }
    }

    /// The CA's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The files a TLS-only redis-server is started with.
    pub fn server_files(&self) -> TlsFiles {
        TlsFiles { cert: self.dir.path().join("server.pem"), key: self.dir.path().join("server.key"), ca: self.ca() }
    }
}
