//! PostgreSQL over TLS (`chat_shared::pg_tls`) against a real server: a
//! private cluster with `ssl = on`, a certificate for `localhost` from a CA
//! made here, and a pg_hba.conf that refuses every connection without TLS,
//! as RDS does with `rds.force_ssl = 1`. Logins use SCRAM with channel
//! binding required, so the TLS stream's `tls-server-end-point` is checked
//! too.
//!
//! It needs the PostgreSQL server binaries (`initdb`, `pg_ctl`): from
//! `PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`, else
//! `pg_config --bindir`, else `PATH`. Without them it fails, saying what to
//! install; it never skips. As root (CI) the server runs as the `postgres`
//! user, which initdb requires.
//!
//! One cluster serves every case (initdb takes seconds here), so the cases
//! run in one test, in order; each failure names its case.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use chat_shared::pg_tls;
use chat_shared::store;
use chat_test_support::random_suffix;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use secrecy::SecretString;

const PASSWORD: &str = "tls-test-password";
/// Long enough for a loaded CI machine, short enough that a hang fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A private PostgreSQL cluster in a temporary directory, stopped and
/// removed on drop (also when an assertion fails first).
struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs a server binary, as the `postgres` user when we are root.
    fn run(&self, binary: &str, args: &[&str]) -> Output {
        run_pg(&self.bindir, self.as_postgres, binary, args)
    }

    /// The cluster's CA certificate, and one from a CA it does not use.
    fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    fn other_ca(&self) -> String {
        self.dir.join("other-ca.pem").display().to_string()
    }

    /// A URL to `host` (TCP to 127.0.0.1 whatever the name, so "localhost"
    /// never tries ::1) with the given query parameters.
    fn url(&self, host: &str, query: &str) -> SecretString {
        let sep = if query.is_empty() { "" } else { "&" };
        SecretString::from(format!(
            "postgres://postgres:{PASSWORD}@{host}:{}/postgres?hostaddr=127.0.0.1\
             &channel_binding=require{sep}{query}",
            self.port
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        let _ = run_pg(
            &self.bindir,
            self.as_postgres,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "stop"],
        );
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run_pg(bindir: &Path, as_postgres: bool, binary: &str, args: &[&str]) -> Output {
    let program = bindir.join(binary);
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn must(output: Output, what: &str, log: &Path) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}\nserver log {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        log.display(),
        fs::read_to_string(log).unwrap_or_default()
    );
}

/// Where `initdb` and `pg_ctl` are; fails the test when nowhere.
fn pg_bindir() -> PathBuf {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_server(&dir),
            "PG_BINDIR={} has no initdb and pg_ctl",
            dir.display()
        );
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return dir;
        }
    }
    if let Some(dir) =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).find(|d| has_server(d))
    {
        return dir;
    }
    panic!(
        "the PostgreSQL server binaries (initdb, pg_ctl) were not found, and this test needs \
         them to start a TLS-only server: install them (Debian: apt-get install postgresql; \
         scripts/test.sh does that as root) or set PG_BINDIR to their directory"
    )
}

/// A self-signed CA.
fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

/// The server's certificate, for `localhost` only; and its key.
fn server_cert(ca: &Issuer<'static, KeyPair>) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params
        .extended_key_usages
        .push(ExtendedKeyUsagePurpose::ServerAuth);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, ca).expect("server certificate");
    (cert.pem(), key.serialize_pem())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// initdb, certificates, TLS-only pg_hba.conf, start.
fn start_cluster() -> Cluster {
    let bindir = pg_bindir();
    let dir = std::env::temp_dir().join(format!("chat-pg-tls-{}", random_suffix()));
    fs::create_dir(&dir).expect("temporary directory");
    let as_postgres = fs::metadata(&dir).expect("stat").uid() == 0;
    let cluster = Cluster {
        dir,
        bindir,
        port: free_port(),
        as_postgres,
    };
    let dir = &cluster.dir;
    let log = dir.join("server.log");

    let (ca_pem, ca) = new_ca("chat-backend test CA");
    let (other_pem, _) = new_ca("some other CA");
    let (cert, key) = server_cert(&ca);
    fs::write(dir.join("ca.pem"), ca_pem).expect("write");
    fs::write(dir.join("other-ca.pem"), other_pem).expect("write");
    fs::write(dir.join("server.crt"), cert).expect("write");
    fs::write(dir.join("server.key"), key).expect("write");
    fs::write(dir.join("password"), PASSWORD).expect("write");
    // The server refuses a key that others may read.
    fs::set_permissions(dir.join("server.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
    if as_postgres {
        // initdb and the server run as postgres, and must own all of it.
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .output()
            .expect("chown");
        assert!(
            chown.status.success(),
            "chown -R postgres: {} failed (is there a postgres user?): {}",
            dir.display(),
            String::from_utf8_lossy(&chown.stderr)
        );
    }

    let data = cluster.data().display().to_string();
    let pwfile = format!("--pwfile={}", dir.join("password").display());
    must(
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth=scram-sha-256",
                &pwfile,
            ],
        ),
        "initdb",
        &log,
    );
    let hba = "# TLS only, as RDS with rds.force_ssl = 1.\n\
               hostnossl all all all reject\n\
               hostssl all all 127.0.0.1/32 scram-sha-256\n";
    fs::write(cluster.data().join("pg_hba.conf"), hba).expect("pg_hba.conf");
    let conf = format!(
        "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
         ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
        cluster.port,
        dir.display(),
        dir.join("server.crt").display(),
        dir.join("server.key").display(),
    );
    let mut postgresql_conf =
        fs::read_to_string(cluster.data().join("postgresql.conf")).expect("postgresql.conf");
    postgresql_conf.push_str(&conf);
    fs::write(cluster.data().join("postgresql.conf"), postgresql_conf).expect("postgresql.conf");

    let log_arg = log.display().to_string();
    must(
        cluster.run(
            "pg_ctl",
            &["-D", &data, "-l", &log_arg, "-w", "-t", "60", "start"],
        ),
        "pg_ctl start",
        &log,
    );
    cluster
}

async fn connect(url: &SecretString) -> anyhow::Result<tokio_postgres::Client> {
    let (client, _task) = tokio::time::timeout(CONNECT_TIMEOUT, pg_tls::connect(url))
        .await
        .expect("connecting timed out")?;
    Ok(client)
}

/// Connects, and checks the session really is encrypted.
async fn connects_encrypted(case: &str, url: &SecretString) {
    let client = connect(url)
        .await
        .unwrap_or_else(|e| panic!("{case}: should connect, got: {e:#}"));
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{case}: query failed: {e}"))
        .get(0);
    assert!(ssl, "{case}: the session is not encrypted");
}

/// Fails to connect, with an error whose text has every one of `says`.
async fn refused(case: &str, url: &SecretString, says: &[&str]) {
    match connect(url).await {
        Ok(_) => panic!("{case}: connected, but should have been refused"),
        Err(e) => {
            let text = format!("{e:#}");
            for part in says {
                assert!(text.contains(part), "{case}: error lacks {part:?}: {text}");
            }
            assert!(
                !text.contains(PASSWORD),
                "{case}: the password leaked: {text}"
            );
        }
    }
}

#[tokio::test]
async fn tls_against_a_server_that_requires_it() {
    let cluster = start_cluster();
    let ca = format!("sslrootcert={}", cluster.ca());
    let other_ca = format!("sslrootcert={}", cluster.other_ca());

    // verify-full with the right CA and host: connects, encrypted, and both
    // ways the service connects work through it: migrations and the pool.
    let full = cluster.url("localhost", &format!("sslmode=verify-full&{ca}"));
    connects_encrypted("verify-full, right CA and host", &full).await;
    let applied = store::migrate(&full)
        .await
        .unwrap_or_else(|e| panic!("migrate over verify-full: {e:#}"));
    assert!(applied > 0, "migrations ran over TLS");
    let pool = store::connect_pool(&full, 2).expect("pool");
    let client = pool.get().await.expect("a pooled connection over TLS");
    let rooms: i64 = client
        .query_one("SELECT count(*) FROM rooms", &[])
        .await
        .expect("the migrated schema")
        .get(0);
    assert_eq!(rooms, 0);
    let cost: String = client
        .query_one("SHOW random_page_cost", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(cost, "1.1", "the pool's session set-up ran");
    drop(client);

    // The certificate names localhost, not 127.0.0.1.
    let wrong_host = cluster.url("127.0.0.1", &format!("sslmode=verify-full&{ca}"));
    refused(
        "verify-full, wrong host name",
        &wrong_host,
        &[
            "TLS: certificate not valid for host '127.0.0.1'",
            "localhost",
        ],
    )
    .await;
    // verify-ca checks the chain only.
    connects_encrypted(
        "verify-ca, wrong host name",
        &cluster.url("127.0.0.1", &format!("sslmode=verify-ca&{ca}")),
    )
    .await;

    // Untrusted CA: another file, the built-in Amazon roots, the system's.
    refused(
        "verify-full, another CA's file",
        &cluster.url("localhost", &format!("sslmode=verify-full&{other_ca}")),
        &["TLS: certificate signed by an untrusted CA", "other-ca.pem"],
    )
    .await;
    refused(
        "verify-ca, no sslrootcert (the built-in Amazon roots)",
        &cluster.url("localhost", "sslmode=verify-ca"),
        &["TLS: certificate signed by an untrusted CA", "Amazon RDS"],
    )
    .await;
    refused(
        "sslrootcert=system (verify-full by default)",
        &cluster.url("localhost", "sslrootcert=system"),
        &["TLS: certificate signed by an untrusted CA", "system"],
    )
    .await;
    // libpq's rule: require with a root file verifies the chain.
    refused(
        "require with another CA's file",
        &cluster.url("localhost", &format!("sslmode=require&{other_ca}")),
        &["TLS: certificate signed by an untrusted CA"],
    )
    .await;

    // Encrypted without verification: require, and prefer (the default).
    connects_encrypted(
        "require, no sslrootcert",
        &cluster.url("127.0.0.1", "sslmode=require"),
    )
    .await;
    connects_encrypted("no sslmode (prefer)", &cluster.url("127.0.0.1", "")).await;

    // The server refuses plain text: the error says why, and what to do.
    let disable = cluster.url("localhost", "sslmode=disable");
    refused(
        "sslmode=disable",
        &disable,
        &[
            "server requires TLS",
            "but sslmode=disable",
            "no encryption",
        ],
    )
    .await;
    // What `chat-local migrate` prints at start-up has the cause in it.
    let err = store::migrate(&disable).await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.starts_with("connecting to PostgreSQL to migrate: server requires TLS"),
        "{text}"
    );
    let err = store::migrate(&wrong_host).await.expect_err("refused");
    assert!(
        format!("{err:#}").contains("certificate not valid for host '127.0.0.1'"),
        "{err:#}"
    );
    // The pool hides nothing either: its error keeps the server's reason.
    let pool = store::connect_pool(&disable, 1).expect("pool");
    let err = anyhow::Error::new(pool.get().await.expect_err("refused"));
    assert!(format!("{err:#}").contains("no encryption"), "{err:#}");
}
