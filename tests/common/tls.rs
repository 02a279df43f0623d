//! A test PKI (a CA, a server certificate for chosen names) and a real SEKMET serving HTTPS
//! with it, its own traffic log readable like `sekmet_received`.

use super::{free_port, peers_dir, read_traffic_in};
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509Name, X509NameBuilder, X509};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn name(cn: &str) -> X509Name {
    let mut b = X509NameBuilder::new().unwrap();
    b.append_entry_by_text("CN", cn).unwrap();
    b.build()
}

fn new_ca(cn: &str) -> (X509, PKey<Private>) {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut ca = X509::builder().unwrap();
    ca.set_version(2).unwrap();
    ca.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    ca.set_subject_name(&name(cn)).unwrap();
    ca.set_issuer_name(&name(cn)).unwrap();
    ca.set_pubkey(&key).unwrap();
    ca.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    ca.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    ca.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    ca.sign(&key, MessageDigest::sha256()).unwrap();
    (ca.build(), key)
}

/// PEM files: a CA, and a server certificate it signed with its key.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and a server certificate valid for exactly these DNS names and IP addresses (its
/// subject CN is the first DNS name, else the first IP), written into `dir`.
pub fn make_pki(dir: &Path, dns: &[&str], ips: &[&str]) -> Pki {
    let (ca, ca_key) = new_ca("fhir-gateway test CA");
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut srv = X509::builder().unwrap();
    srv.set_version(2).unwrap();
    srv.set_serial_number(&BigNum::from_u32(2).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    let cn = dns
        .first()
        .or(ips.first())
        .expect("a name for the certificate");
    srv.set_subject_name(&name(cn)).unwrap();
    srv.set_issuer_name(ca.subject_name()).unwrap();
    srv.set_pubkey(&key).unwrap();
    srv.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    srv.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    let mut san = SubjectAlternativeName::new();
    for d in dns {
        san.dns(d);
    }
    for ip in ips {
        san.ip(ip);
    }
    let san = san.build(&srv.x509v3_context(Some(&ca), None)).unwrap();
    srv.append_extension(san).unwrap();
    srv.sign(&ca_key, MessageDigest::sha256()).unwrap();
    let srv = srv.build();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&pki.ca, ca.to_pem().unwrap()).unwrap();
    std::fs::write(&pki.cert, srv.to_pem().unwrap()).unwrap();
    std::fs::write(&pki.key, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    pki
}

/// A CA no test certificate chains to, as a PEM file in `dir`.
pub fn unrelated_ca(dir: &Path) -> PathBuf {
    let (ca, _) = new_ca("some other CA");
    let p = dir.join("other-ca.pem");
    std::fs::write(&p, ca.to_pem().unwrap()).unwrap();
    p
}

/// A real SEKMET serving HTTPS on 127.0.0.1 with a certificate of the test PKI, its traffic
/// log on; killed on drop.
pub struct TlsSekmet {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub pki: Pki,
    /// The DNS names its certificate is valid for (the first is how `direct` reaches it).
    pub names: Vec<String>,
}

impl TlsSekmet {
    /// `dns` / `ips`: the certificate's names (at least one DNS name); `base_host`: the host
    /// of SEKMET's own base URL (`https://<base_host>:<port>/fhir`), the one a gateway in
    /// front of it should be configured with, so that its links are rewritten.
    pub async fn start(dns: &[&str], ips: &[&str], base_host: &str) -> TlsSekmet {
        let sekmet = peers_dir().join("sekmet-venv/bin/sekmet");
        assert!(sekmet.exists(), "run scripts/peers.sh install");
        assert!(
            !dns.is_empty(),
            "TlsSekmet needs a DNS name to be reached by"
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fgw-tls-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let pki = make_pki(&dir, dns, ips);
        let settings = dir.join("settings.yaml");
        std::fs::write(
            &settings,
            format!(
                "host: 127.0.0.1\nport: {port}\nbase_url: https://{base_host}:{port}/fhir\ndata_dir: {}\nvalidation: {{inbound: strict}}\nsimulator: {{enabled: false}}\nlog_inbound: true\ntls_certfile: {}\ntls_keyfile: {}\n",
                dir.join("data").display(),
                pki.cert.display(),
                pki.key.display()
            ),
        )
        .unwrap();
        let child = Command::new(&sekmet)
            .args(["serve", "-c"])
            .arg(&settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = TlsSekmet {
            child,
            port,
            dir,
            pki,
            names: dns.iter().map(|d| d.to_string()).collect(),
        };
        let direct = s.direct();
        let deadline = Instant::now() + Duration::from_secs(60);
        while direct
            .get(format!("{}/metadata", s.direct_base()))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "TLS SEKMET did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s
    }

    /// A client that trusts the test CA and reaches SEKMET by its certificate's names.
    pub fn direct(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.pki.ca).unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(30));
        for n in &self.names {
            b = b.resolve(n, addr);
        }
        b.build().unwrap()
    }

    /// The FHIR base by the certificate's first name (for `direct`).
    pub fn direct_base(&self) -> String {
        format!("https://{}:{}/fhir", self.names[0], self.port)
    }

    fn db(&self) -> PathBuf {
        self.dir.join("data/sekmet.db")
    }

    /// The requests it recorded for a correlation id (see `sekmet_received`).
    pub fn received(&self, correlation_id: &str) -> Vec<Value> {
        read_traffic_in(&self.db(), correlation_id, Duration::from_secs(3))
    }

    /// Asserts it never received a request with this correlation id: a later marker request
    /// is in its log, the id is not.
    pub async fn assert_never_received(&self, correlation_id: &str) {
        let marker = format!("marker-{}", uuid::Uuid::new_v4());
        let r = self
            .direct()
            .get(format!("{}/metadata", self.direct_base()))
            .header("X-Request-Id", &marker)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(self.received(&marker).len(), 1, "marker not logged");
        let got = read_traffic_in(&self.db(), correlation_id, Duration::ZERO);
        assert!(got.is_empty(), "SEKMET received {correlation_id}: {got:?}");
    }
}

impl Drop for TlsSekmet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
