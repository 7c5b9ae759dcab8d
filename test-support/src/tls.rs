//! TLS for the tests: a certificate from a test CA, made with openssl, and a site that also
//! listens with TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Site, TempDir, free_port};

/// A server certificate for localhost and 127.0.0.1 and the test CA that signed it, made with
/// openssl in a directory: all PEM.
pub struct TestCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TestCertificate {
    pub fn make(dir: &Path) -> Self {
        let file = |name: &str| dir.join(name).display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let steps: [Vec<String>; 3] = [
            [
                "req",
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=nginx-graceful test CA",
            ]
            .iter()
            .chain(&ec)
            .map(|s| s.to_string())
            .chain(["-keyout".into(), file("ca.key"), "-out".into(), file("ca.pem")])
            .collect(),
            ["req", "-subj", "/CN=localhost"]
                .iter()
                .chain(&ec)
                .map(|s| s.to_string())
                .chain(["-keyout".into(), file("key.pem"), "-out".into(), file("leaf.csr")])
                .collect(),
            [
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &file("leaf.csr"),
                "-CA",
                &file("ca.pem"),
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(
                [
                    "-CAkey",
                    &file("ca.key"),
                    "-CAcreateserial",
                    "-extfile",
                    &file("leaf.ext"),
                ]
                .map(String::from),
            )
            .chain(["-out".into(), file("cert.pem")])
            .collect(),
        ];
        for args in steps {
            let output = Command::new("openssl")
                .args(&args)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        }
    }
}

/// A site whose server block also listens with TLS (and `params`, like `http2`) on a port of its
/// own, with a certificate made for it.
pub struct TlsSite {
    pub site: Site,
    /// `https://127.0.0.1:PORT`, the TLS listener.
    pub base: String,
    pub certificate: TestCertificate,
    _dir: TempDir,
}

impl TlsSite {
    pub fn new(params: &str) -> Self {
        let dir = TempDir::new("tls");
        let certificate = TestCertificate::make(&dir.0);
        let port = free_port();
        let listen = format!(
            "listen 127.0.0.1:{port} ssl {params}; ssl_certificate {}; ssl_certificate_key {};",
            certificate.cert.display(),
            certificate.key.display()
        );
        Self {
            site: Site::build(true, &listen),
            base: format!("https://127.0.0.1:{port}"),
            certificate,
            _dir: dir,
        }
    }
}
