//! A real PostgreSQL server for the fleet tests: the distribution's server binaries
//! (`softhsm-config/install-deps.sh` installs them), `initdb` in a temp dir, on a free port
//! of 127.0.0.1, run as the `postgres` user when the tests run as root (PostgreSQL refuses
//! root). One server per test process, started on first use; each test gets a database of
//! its own. The server dies with the test process (`PR_SET_PDEATHSIG` from a thread that
//! lives as long as the process).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The server: its port and directory.
pub struct PgServer {
    port: u16,
    dir: PathBuf,
}

fn bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (/usr/lib/postgresql/*/bin): run softhsm-config/install-deps.sh")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The uid and gid to run the server as: `postgres` when we are root, else ourselves.
fn server_user() -> Option<(u32, u32)> {
    if !nix::unistd::getuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("the postgres user (created by the postgresql package)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn as_server_user(command: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
}

/// Makes a new cluster in a temp dir owned by the server user; returns (bin, dir, data).
fn init() -> (PathBuf, PathBuf, PathBuf) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    remove_stale_clusters();
    let bin = bin_dir();
    let user = server_user();
    let dir = std::env::temp_dir().join(format!(
        "wrapd-pg-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    }
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args([
            "--auth=trust",
            "--username=wrapd",
            "--encoding=UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_server_user(&mut initdb, server_user());
    let out = initdb.output().expect("initdb");
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // TLS on (clients may still connect without it): a CA of the test's own and a server
    // certificate for 127.0.0.1, made with wrapd's own PKI code.
    let validity = wrapd::pki::Validity::days(2);
    let ca = wrapd::pki::new_ca("wrapd test database CA", validity).unwrap();
    let cert = wrapd::pki::issue_server(&ca, &["127.0.0.1".to_owned()], validity).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
    for (name, text, mode) in [
        ("server.crt", cert.cert.as_str(), 0o644),
        ("server.key", cert.key.as_str(), 0o600),
    ] {
        let path = data.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
        if let Some((uid, gid)) = server_user() {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
    }
    (bin, dir, data)
}

/// Removes the clusters of earlier test processes that are gone (a shared server cannot
/// clean up after itself: it lives as long as its process).
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("wrapd-pg-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Starts `postgres` on `data` and `port`; with `tied`, it gets SIGTERM when the calling
/// thread ends.
fn spawn(
    bin: &std::path::Path,
    data: &std::path::Path,
    port: u16,
    log: &std::path::Path,
    tied: bool,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut server = Command::new(bin.join("postgres"));
    server
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "unix_socket_directories=", "-c", "fsync=off"])
        .args(["-c", "max_connections=300", "-c", "synchronous_commit=off"])
        .args(["-c", "ssl=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    as_server_user(&mut server, server_user());
    if tied {
        // SAFETY: prctl is async-signal-safe; it only sets this child's death signal.
        #[allow(unsafe_code)]
        unsafe {
            server.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    server.spawn().expect("postgres")
}

fn wait_ready(port: u16, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("host=127.0.0.1 port={port} user=wrapd dbname=postgres");
        if postgres::Client::connect(&url, postgres::NoTls).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start() -> PgServer {
    let (bin, dir, data) = init();
    let port = free_port();
    let log = dir.join("server.log");
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_log = log.clone();
    // The server's parent thread must outlive every test: PR_SET_PDEATHSIG fires when the
    // thread that forked the child ends.
    std::thread::spawn(move || {
        let mut child = spawn(&bin, &data, port, &thread_log, true);
        tx.send(()).unwrap();
        // Waiting keeps this thread (the server's parent) alive as long as the server.
        let _ = child.wait();
    });
    rx.recv().unwrap();
    wait_ready(port, &log);
    PgServer { port, dir }
}

/// A server of a test's own, which the test stops and starts again (database outages).
pub struct OwnedPg {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// Its port.
    pub port: u16,
    child: Option<Child>,
}

impl OwnedPg {
    /// A new cluster, started.
    pub fn start() -> Self {
        let (bin, dir, data) = init();
        let mut server = Self {
            bin,
            data,
            log: dir.join("server.log"),
            port: free_port(),
            child: None,
        };
        server.restart();
        server
    }

    /// Stops it (fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        // Not tied to a thread (tests start it from short-lived ones): Drop stops it.
        self.child = Some(spawn(&self.bin, &self.data, self.port, &self.log, false));
        wait_ready(self.port, &self.log);
    }

    /// A new database on it (made from a thread of its own: callable from async tests).
    pub fn database(&self) -> String {
        let port = self.port;
        std::thread::spawn(move || database_on(port))
            .join()
            .unwrap()
    }
}

impl Drop for OwnedPg {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.data.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn database_on(port: u16) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("wrapd_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut admin = postgres::Client::connect(
        &format!("host=127.0.0.1 port={port} user=wrapd dbname=postgres"),
        postgres::NoTls,
    )
    .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    format!("postgresql://wrapd@127.0.0.1:{port}/{name}")
}

/// The test process's server.
pub fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(start)
}

impl PgServer {
    /// The CA certificate (PEM) of the server's TLS certificate (for 127.0.0.1).
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.pem")).unwrap()
    }

    /// A new, empty database; its URL (`postgresql://wrapd@127.0.0.1:PORT/NAME`).
    pub fn database(&self) -> String {
        database_on(self.port)
    }

    /// Runs SQL as the superuser in database `url`.
    pub fn sql(url: &str, sql: &str) {
        let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
        client.batch_execute(sql).unwrap();
    }
}
