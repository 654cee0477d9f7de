//! Real peers for the integration tests: the IAM emulator process, a dev PKI
//! from rcgen, the credgate binary on port 0, and mTLS gRPC clients.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use aws_sdk_iam::config::{BehaviorVersion, Credentials, Region};
use credgate::{
    api::password_service_client::PasswordServiceClient,
    devpki::{Authority, ClientSpec, Issued},
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Bounded wait for processes to say they are ready.
const STARTUP: Duration = Duration::from_secs(30);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's Python (the test command creates it), or `$CREDGATE_TEST_PYTHON`.
pub fn python() -> PathBuf {
    std::env::var_os("CREDGATE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// A tool from the venv (grpcurl).
pub fn venv_bin(name: &str) -> PathBuf {
    python().with_file_name(name)
}

/// Unique names so tests sharing an emulator never collide.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Reads lines from a child's stdout on a thread, keeping all of them.
fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> mpsc::Receiver<String> {
    collect_lines_held(stream, lines, None)
}

/// As [`collect_lines`]; with `hold`, reading stops after credgate's
/// "listening" line until `hold` yields (or its sender is dropped), so the
/// pipe fills up as if nobody read it.
fn collect_lines_held(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    hold: Option<mpsc::Receiver<()>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut hold = hold;
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let listening = line.contains("\"credgate listening\"");
            lines.lock().expect("lines").push(line.clone());
            let _ = tx.send(line);
            if listening && let Some(hold) = hold.take() {
                let _ = hold.recv();
            }
        }
    });
    rx
}

// ---------------------------------------------------------------- emulator

/// The IAM emulator (moto + ChangePassword + fault switch) as a process.
pub struct Emulator {
    pub endpoint: String,
    pub region: String,
    admin: Credentials,
    _child: ChildGuard,
    _stdin: ChildStdin,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Emulator {
    /// A fresh emulator of its own: for tests that change account-wide state
    /// (the password policy).
    pub fn start() -> Emulator {
        let mut child = Command::new(python())
            .arg(repo().join("tests/emulator/iam_emulator.py"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the IAM emulator with {:?}: {e}", python()));
        let stdin = child.stdin.take().expect("stdin");
        let rx = collect_lines(child.stdout.take().expect("stdout"), Arc::default());
        let line = rx
            .recv_timeout(STARTUP)
            .expect("the IAM emulator did not report readiness");
        let ready: Value = serde_json::from_str(&line).expect("emulator JSON line");
        let s = |k: &str| ready[k].as_str().expect(k).to_owned();
        Emulator {
            endpoint: s("endpoint"),
            region: s("region"),
            admin: Credentials::new(
                s("admin_access_key_id"),
                s("admin_secret_access_key"),
                None,
                None,
                "emulator-admin",
            ),
            _child: ChildGuard(child),
            _stdin: stdin,
        }
    }

    /// One emulator shared by the tests that touch only their own users.
    pub fn shared() -> &'static Emulator {
        static SHARED: OnceLock<Emulator> = OnceLock::new();
        SHARED.get_or_init(Emulator::start)
    }

    fn sdk_config(&self, creds: Credentials) -> aws_sdk_iam::Config {
        aws_sdk_iam::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .endpoint_url(&self.endpoint)
            .credentials_provider(creds)
            .build()
    }

    /// The administrator's credentials (for other AWS clients, e.g. STS).
    pub fn admin_credentials(&self) -> Credentials {
        self.admin.clone()
    }

    /// An IAM client signing as the emulator's administrator.
    pub fn admin(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::from_conf(self.sdk_config(self.admin.clone()))
    }

    /// Creates an IAM user allowed `actions`, with a console password (unless
    /// `None`) and an access key.
    pub async fn user(&self, password: Option<&str>, actions: &[&str]) -> IamUser {
        self.user_named(&unique("user"), password, actions).await
    }

    /// A user allowed everything credgate needs, with `password`, named
    /// `name` (a templated caller's IAM user is built from its identity).
    pub async fn standard_user_named(&self, name: &str, password: &str) -> IamUser {
        self.user_named(
            name,
            Some(password),
            &[
                "iam:ChangePassword",
                "iam:GetAccountPasswordPolicy",
                "iam:GetUser",
                "iam:ListAccessKeys",
                "iam:GetAccessKeyLastUsed",
            ],
        )
        .await
    }

    /// As [`Emulator::user`], named `name`.
    pub async fn user_named(
        &self,
        name: &str,
        password: Option<&str>,
        actions: &[&str],
    ) -> IamUser {
        let name = name.to_owned();
        let admin = self.admin();
        admin
            .create_user()
            .user_name(&name)
            .send()
            .await
            .expect("CreateUser");
        if let Some(password) = password {
            admin
                .create_login_profile()
                .user_name(&name)
                .password(password)
                .send()
                .await
                .expect("CreateLoginProfile");
        }
        if !actions.is_empty() {
            let policy = serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            });
            admin
                .put_user_policy()
                .user_name(&name)
                .policy_name("credgate-test")
                .policy_document(policy.to_string())
                .send()
                .await
                .expect("PutUserPolicy");
        }
        let key = self.access_key(&name).await;
        IamUser { name, key }
    }

    /// A user allowed everything credgate needs with the `profiles` key
    /// source, with `password`.
    pub async fn standard_user(&self, password: &str) -> IamUser {
        self.standard_user_named(&unique("user"), password).await
    }

    /// A user with a console password (unless `None`), a key, and exactly
    /// the shipped policy `deploy/aws/<policy>` as its only policy.
    pub async fn user_with_policy(&self, password: Option<&str>, policy: &str) -> IamUser {
        self.user_named_with_policy(&unique("user"), password, policy)
            .await
    }

    /// As [`Emulator::user_with_policy`], named `name`.
    pub async fn user_named_with_policy(
        &self,
        name: &str,
        password: Option<&str>,
        policy: &str,
    ) -> IamUser {
        let user = self.user_named(name, password, &[]).await;
        let document = std::fs::read_to_string(repo().join("deploy/aws").join(policy))
            .unwrap_or_else(|e| panic!("deploy/aws/{policy}: {e}"));
        self.admin()
            .put_user_policy()
            .user_name(&user.name)
            .policy_name("shipped")
            .policy_document(document)
            .send()
            .await
            .expect("PutUserPolicy");
        user
    }

    /// A Secrets Manager client signing as the administrator.
    pub fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::from_conf(
            aws_sdk_secretsmanager::Config::builder()
                .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
                .region(aws_sdk_secretsmanager::config::Region::new(
                    self.region.clone(),
                ))
                .endpoint_url(&self.endpoint)
                .credentials_provider(self.admin.clone())
                .build(),
        )
    }

    /// Stores `key` as the secret `name` (the enrolment of its user).
    pub async fn put_secret(&self, name: &str, key: &AccessKey) {
        self.secrets()
            .create_secret()
            .name(name)
            .secret_string(
                serde_json::json!({"access_key_id": key.id, "secret_access_key": key.secret})
                    .to_string(),
            )
            .send()
            .await
            .expect("CreateSecret");
    }

    /// The key a stage of secret `name` holds (`AWSCURRENT`, `AWSPENDING`,
    /// `AWSPREVIOUS`), if that stage exists.
    pub async fn secret_key(&self, name: &str, stage: &str) -> Option<AccessKey> {
        let out = self
            .secrets()
            .get_secret_value()
            .secret_id(name)
            .version_stage(stage)
            .send()
            .await
            .ok()?;
        let v: Value = serde_json::from_str(out.secret_string()?).expect("JSON secret");
        Some(AccessKey {
            id: v["access_key_id"].as_str()?.to_owned(),
            secret: v["secret_access_key"].as_str()?.to_owned(),
            session_token: None,
        })
    }

    /// The ids of `user`'s access keys, with whether each is active.
    pub async fn access_keys(&self, user: &str) -> Vec<(String, bool)> {
        let out = self
            .admin()
            .list_access_keys()
            .user_name(user)
            .send()
            .await
            .expect("ListAccessKeys");
        out.access_key_metadata()
            .iter()
            .map(|k| {
                (
                    k.access_key_id().unwrap_or_default().to_owned(),
                    k.status() == Some(&aws_sdk_iam::types::StatusType::Active),
                )
            })
            .collect()
    }

    /// Whose key `key` is, by STS (an `Err` with AWS's error code when it
    /// does not sign).
    pub async fn who_signs(&self, key: &AccessKey) -> Result<String, String> {
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::Config::builder()
                .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                .region(aws_sdk_sts::config::Region::new(self.region.clone()))
                .endpoint_url(&self.endpoint)
                .credentials_provider(Credentials::new(
                    key.id.clone(),
                    key.secret.clone(),
                    None,
                    None,
                    "test",
                ))
                .build(),
        );
        match sts.get_caller_identity().send().await {
            Ok(out) => Ok(out.arn().unwrap_or_default().to_owned()),
            Err(e) => {
                use aws_sdk_sts::error::ProvideErrorMetadata;
                Err(e.code().unwrap_or("no code").to_owned())
            }
        }
    }

    /// A new access key for `user`.
    pub async fn access_key(&self, user: &str) -> AccessKey {
        let out = self
            .admin()
            .create_access_key()
            .user_name(user)
            .send()
            .await
            .expect("CreateAccessKey");
        let key = out.access_key().expect("key");
        AccessKey {
            id: key.access_key_id().to_owned(),
            secret: key.secret_access_key().to_owned(),
            session_token: None,
        }
    }

    /// Sets the account password policy (account-wide: use a private emulator).
    pub async fn set_policy(
        &self,
        min_len: i32,
        symbols: bool,
        numbers: bool,
        upper: bool,
        lower: bool,
        reuse: Option<i32>,
    ) {
        self.admin()
            .update_account_password_policy()
            .minimum_password_length(min_len)
            .require_symbols(symbols)
            .require_numbers(numbers)
            .require_uppercase_characters(upper)
            .require_lowercase_characters(lower)
            .allow_users_to_change_password(true)
            .set_password_reuse_prevention(reuse)
            .send()
            .await
            .expect("UpdateAccountPasswordPolicy");
    }

    /// Whether `password` is `user`'s console password now (the emulator's
    /// stand-in for a console sign-in; changes nothing).
    pub async fn password_is(&self, user: &IamUser, password: &str) -> bool {
        let v = self
            .http(
                "POST",
                "/_emulator/check-password",
                Some(serde_json::json!({"user": user.name, "password": password})),
            )
            .await;
        v["matches"].as_bool().expect("matches")
    }

    async fn http(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect emulator");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "{response}"
        );
        serde_json::from_str(body).expect("JSON body")
    }

    /// Arms the fault switch for `action` by `user`.
    pub async fn fault(&self, action: &str, user: &str, fault: Value) {
        let mut body = fault;
        body["action"] = action.into();
        body["user"] = user.into();
        self.http("POST", "/_emulator/faults", Some(body)).await;
    }

    /// Arms the fault switch for `action` by anyone (private emulators only).
    pub async fn fault_for_anyone(&self, action: &str, fault: Value) {
        let mut body = fault;
        body["action"] = action.into();
        self.http("POST", "/_emulator/faults", Some(body)).await;
    }

    /// How many `action` requests signed by `user` reached the emulator.
    pub async fn calls(&self, action: &str, user: &str) -> u64 {
        let v = self
            .http(
                "GET",
                &format!("/_emulator/calls?action={action}&user={user}"),
                None,
            )
            .await;
        v["count"].as_u64().expect("count")
    }

    /// How many `action` requests reached the emulator, whoever signed them
    /// (for private emulators).
    pub async fn all_calls(&self, action: &str) -> u64 {
        let v = self
            .http("GET", &format!("/_emulator/calls?action={action}"), None)
            .await;
        v["count"].as_u64().expect("count")
    }

    /// A new access key of the account root user (emulated: AKIA..., STS
    /// reports `arn:aws:iam::<account>:root`).
    pub async fn root_key(&self) -> AccessKey {
        let v = self.http("POST", "/_emulator/root-key", None).await;
        let s = |k: &str| v[k].as_str().expect(k).to_owned();
        AccessKey {
            id: s("access_key_id"),
            secret: s("secret_access_key"),
            session_token: None,
        }
    }

    /// Credentials of a session of a new role allowed `actions` (sts:AssumeRole).
    pub async fn role_session(&self, actions: &[&str]) -> IamUser {
        let admin = self.admin();
        let role = unique("role");
        let trust = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
        });
        let created = admin
            .create_role()
            .role_name(&role)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .expect("CreateRole");
        let allow = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        });
        admin
            .put_role_policy()
            .role_name(&role)
            .policy_name("allow")
            .policy_document(allow.to_string())
            .send()
            .await
            .expect("PutRolePolicy");
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::Config::builder()
                .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                .region(aws_sdk_sts::config::Region::new(self.region.clone()))
                .endpoint_url(&self.endpoint)
                .credentials_provider(self.admin_credentials())
                .build(),
        );
        let assumed = sts
            .assume_role()
            .role_arn(created.role().expect("role").arn())
            .role_session_name("credgate-test")
            .send()
            .await
            .expect("AssumeRole");
        let creds = assumed.credentials().expect("credentials");
        IamUser {
            name: role,
            key: AccessKey {
                id: creds.access_key_id().to_owned(),
                secret: creds.secret_access_key().to_owned(),
                session_token: Some(creds.session_token().to_owned()),
            },
        }
    }
}

/// An access key, as written into the AWS credentials file.
#[derive(Clone)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
    pub session_token: Option<String>,
}

/// An IAM user in the emulator.
pub struct IamUser {
    pub name: String,
    pub key: AccessKey,
}

// ---------------------------------------------------------------- PKI

/// A CA with a server certificate for localhost/127.0.0.1.
pub struct Pki {
    pub ca: Authority,
    pub server: Issued,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = Authority::new("credgate test CA").expect("CA");
        let server = ca
            .server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server cert");
        Pki { ca, server }
    }

    pub fn client(&self, spec: &ClientSpec) -> Issued {
        self.ca.client(spec).expect("client cert")
    }

    pub fn spiffe_client(&self, id: &str) -> Issued {
        self.client(&ClientSpec::spiffe(id))
    }
}

// ---------------------------------------------------------------- credgate

/// One `[[callers]]` entry plus the key its profile holds.
pub struct CallerEntry {
    /// e.g. `spiffe_id = "spiffe://..."`.
    pub matcher: String,
    pub iam_user: String,
    pub profile: String,
    pub key: AccessKey,
}

impl CallerEntry {
    pub fn spiffe(id: &str, user: &IamUser) -> CallerEntry {
        CallerEntry {
            matcher: format!("spiffe_id = {id:?}"),
            iam_user: user.name.clone(),
            profile: user.name.clone(),
            key: user.key.clone(),
        }
    }
}

/// Everything needed to start credgate.
pub struct Setup<'a> {
    pub emulator_endpoint: String,
    pub pki: &'a Pki,
    pub callers: Vec<CallerEntry>,
    /// Extra TOML appended to the config (e.g. a `[limits]` table).
    pub extra_toml: String,
    /// Extra lines inside `[server]`.
    pub server_toml: String,
    pub crl_pem: Option<String>,
    pub env: Vec<(String, String)>,
    /// Extra lines inside `[aws]`.
    pub aws_toml: String,
    /// Fixed (mTLS, admin) ports instead of port 0.
    pub ports: Option<(u16, u16)>,
    /// Profiles in the AWS credentials file besides the callers' own (those
    /// templated callers' built `aws_profile`s name).
    pub profiles: Vec<(String, AccessKey)>,
    /// Keys from Secrets Manager instead of profiles: every line of
    /// `[keys]` but `source`.
    pub secrets_manager: Option<String>,
}

impl<'a> Setup<'a> {
    pub fn new(emulator: &Emulator, pki: &'a Pki) -> Setup<'a> {
        Setup::with_endpoint(&emulator.endpoint, pki)
    }

    /// A setup whose AWS endpoint is `endpoint` (one nobody listens on, for
    /// tests that must not reach AWS).
    pub fn with_endpoint(endpoint: &str, pki: &'a Pki) -> Setup<'a> {
        Setup {
            emulator_endpoint: endpoint.to_owned(),
            pki,
            callers: Vec::new(),
            extra_toml: String::new(),
            server_toml: String::new(),
            crl_pem: None,
            env: Vec::new(),
            aws_toml: String::new(),
            ports: None,
            profiles: Vec::new(),
            secrets_manager: None,
        }
    }

    /// A profile `name` holding `key` in the AWS credentials file.
    pub fn profile(mut self, name: &str, key: &AccessKey) -> Self {
        self.profiles.push((name.to_owned(), key.clone()));
        self
    }

    /// Keys from Secrets Manager, read as `identity`, with these `[keys]`
    /// lines; the callers get no `aws_profile`.
    pub fn secrets_manager(mut self, identity: &AccessKey, keys_toml: &str) -> Self {
        self.env
            .push(("AWS_ACCESS_KEY_ID".into(), identity.id.clone()));
        self.env
            .push(("AWS_SECRET_ACCESS_KEY".into(), identity.secret.clone()));
        self.secrets_manager = Some(keys_toml.to_owned());
        self
    }

    pub fn caller(mut self, entry: CallerEntry) -> Self {
        self.callers.push(entry);
        self
    }

    pub fn toml(mut self, extra: &str) -> Self {
        self.extra_toml.push_str(extra);
        self.extra_toml.push('\n');
        self
    }

    pub fn server_toml(mut self, line: &str) -> Self {
        self.server_toml.push_str(line);
        self.server_toml.push('\n');
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `tls.crl` holding `pem`.
    pub fn crl(mut self, pem: String) -> Self {
        self.crl_pem = Some(pem);
        self
    }

    /// Shared state in `redis`.
    pub fn redis(self, redis: &Redis) -> Self {
        self.toml(&format!(
            "[state]\nurl = {:?}\nkey_prefix = {:?}\n",
            redis.url(),
            unique("credgate") + ":"
        ))
    }

    /// Writes config, certificates and the AWS credentials file into a temp
    /// directory, returning the directory and the config path.
    pub fn write(&self) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let cert = put("server.crt", &self.pki.server.cert_pem);
        let key = put("server.key", &self.pki.server.key_pem);
        let ca = put("ca.crt", &self.pki.ca.cert_pem);
        let crl = self
            .crl_pem
            .as_ref()
            .map(|pem| format!("crl = {:?}\n", put("ca.crl", pem)))
            .unwrap_or_default();
        let mut credentials = String::new();
        let mut callers = String::new();
        // With Secrets Manager the callers' keys are in their secrets only.
        let keys = self
            .callers
            .iter()
            .filter(|_| self.secrets_manager.is_none())
            .map(|c| (&c.profile, &c.key));
        for (profile, key) in keys.chain(self.profiles.iter().map(|(p, k)| (p, k))) {
            credentials.push_str(&format!(
                "[{profile}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                key.id, key.secret
            ));
            if let Some(token) = &key.session_token {
                credentials.push_str(&format!("aws_session_token = {token}\n"));
            }
        }
        for c in &self.callers {
            // With Secrets Manager a caller's key is its user's secret.
            let profile = match &self.secrets_manager {
                Some(_) => String::new(),
                None => format!("aws_profile = {:?}\n", c.profile),
            };
            callers.push_str(&format!(
                "[[callers]]\n{}\niam_user = {:?}\n{profile}\n",
                c.matcher, c.iam_user
            ));
        }
        let keys = self
            .secrets_manager
            .as_ref()
            .map(|keys| format!("[keys]\nsource = \"secretsmanager\"\n{keys}\n"))
            .unwrap_or_default();
        put("credentials", &credentials);
        put("config", "");
        let (tls_port, admin_port) = self.ports.unwrap_or((0, 0));
        // Short, but no shorter than the default request_timeout (a config
        // error), unless the test sets its own.
        let grace = if self.server_toml.contains("shutdown_grace") {
            ""
        } else {
            "shutdown_grace = \"10s\"\n"
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{tls_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             {grace}{}\n\
             [tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n{crl}\n\
             [aws]\nregion = \"us-east-1\"\nendpoint_url = {:?}\n{}\n{}\n{keys}{callers}",
            self.server_toml, self.emulator_endpoint, self.aws_toml, self.extra_toml
        );
        let path = put("credgate.toml", &config);
        (dir, path)
    }

    pub fn start(self) -> Credgate {
        let (dir, config) = self.write();
        Credgate::spawn(dir, &config, &self.env)
    }

    /// Starts credgate, then stops reading its stdout after the "listening"
    /// line, as if the pipe's reader had gone away; dropping (or calling
    /// `read_again` on) the returned handle resumes reading.
    pub fn start_with_stdout_unread(self) -> (Credgate, StdoutHold) {
        let (dir, config) = self.write();
        let (tx, rx) = mpsc::channel();
        let app = Credgate::spawn_held(dir, &config, &self.env, Some(rx));
        (app, StdoutHold(Some(tx)))
    }

    /// Starts credgate on fixed free ports and waits for its admin port
    /// instead of its "listening" log line (for runs where RUST_LOG hides it).
    pub fn start_quiet(mut self) -> Credgate {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        };
        let (tls_port, admin_port) = (free(), free());
        self.ports = Some((tls_port, admin_port));
        let (dir, config) = self.write();
        Credgate::spawn_quiet(dir, &config, &self.env, tls_port, admin_port)
    }

    /// `credgate serve` on this configuration, which stays usable (for a
    /// restart, another replica, or [`Setup::cli`]).
    pub fn launch(&self) -> Credgate {
        let (dir, config) = self.write();
        Credgate::spawn(dir, &config, &self.env)
    }

    /// `credgate <args> --config <this configuration>` with the setup's
    /// environment plus `env`, run to its end.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> CliRun {
        let (dir, config) = self.write();
        let mut cmd = credgate_command(dir.path());
        cmd.args(args).arg("--config").arg(&config);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("credgate");
        CliRun {
            code: out.status.code(),
            signal: std::os::unix::process::ExitStatusExt::signal(&out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `n` credgate processes on this one configuration (replicas).
    pub fn start_replicas(self, n: usize) -> Vec<Credgate> {
        (0..n)
            .map(|_| {
                let (dir, config) = self.write();
                Credgate::spawn(dir, &config, &self.env)
            })
            .collect()
    }
}

/// A finished command: its exit (code, or the signal that ended it) and
/// its output.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// The stdout lines that are JSON objects.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Holds credgate's stdout unread until dropped or `read_again`.
pub struct StdoutHold(Option<mpsc::Sender<()>>);

impl StdoutHold {
    /// Resumes reading credgate's stdout.
    pub fn read_again(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// The credgate binary, running.
pub struct Credgate {
    pub tls_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
    child: Option<Child>,
}

pub fn credgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_credgate")
}

/// A `Command` for the binary with a clean AWS environment: only the files
/// in `dir` may provide credentials.
pub fn credgate_command(dir: &Path) -> Command {
    let mut cmd = Command::new(credgate_bin());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("AWS_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_SHARED_CREDENTIALS_FILE", dir.join("credentials"))
        .env("AWS_CONFIG_FILE", dir.join("config"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "debug,h2=info,hyper=info,hyper_util=info,tower=info,aws_smithy_runtime=info,aws_config=info,rustls=info");
    cmd
}

/// Runs `credgate check-config` on `config` with the AWS files of `dir`:
/// (exit code, stdout, stderr).
pub fn check_config(dir: &Path, config: &Path, online: bool) -> (Option<i32>, String, String) {
    let mut cmd = credgate_command(dir);
    cmd.args(["check-config", "--config"]).arg(config);
    if online {
        cmd.arg("--online");
    }
    let out = cmd.output().expect("check-config");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The usual test subject: credgate with one SPIFFE caller mapped to a fresh
/// IAM user, and that caller's client certificate.
pub struct Rig {
    pub app: Credgate,
    pub pki: Pki,
    pub user: IamUser,
    pub caller: String,
}

impl Rig {
    /// A new user with `password` and every permission credgate needs.
    pub async fn new(emulator: &Emulator, caller: &str, password: &str) -> Rig {
        let user = emulator.standard_user(password).await;
        Rig::for_user(emulator, caller, user, |setup| setup)
    }

    /// `user` as the caller, with `customize` applied to the setup.
    pub fn for_user(
        emulator: &Emulator,
        caller: &str,
        user: IamUser,
        customize: impl for<'a> FnOnce(Setup<'a>) -> Setup<'a>,
    ) -> Rig {
        let pki = Pki::new();
        let app = customize(Setup::new(emulator, &pki).caller(CallerEntry::spiffe(caller, &user)))
            .start();
        Rig {
            app,
            pki,
            user,
            caller: caller.to_owned(),
        }
    }

    /// A client presenting the caller's certificate.
    pub async fn client(&self) -> PasswordServiceClient<Channel> {
        self.app
            .client(&self.pki, &self.pki.spiffe_client(&self.caller))
            .await
    }

    /// One ChangePassword from the caller.
    pub async fn change(
        &self,
        old: &str,
        new: &str,
    ) -> Result<credgate::api::ChangePasswordResponse, tonic::Status> {
        self.client()
            .await
            .change_password(change(old, new))
            .await
            .map(|r| r.into_inner())
    }
}

impl Credgate {
    /// `credgate serve` on `config`, its output collected into the returned
    /// lines; the receiver gets each stdout line as it comes.
    fn start_serve(
        dir: &tempfile::TempDir,
        config: &Path,
        env: &[(String, String)],
        hold: Option<mpsc::Receiver<()>>,
    ) -> (Child, Arc<Mutex<Vec<String>>>, mpsc::Receiver<String>) {
        let mut cmd = credgate_command(dir.path());
        cmd.args(["serve", "--config"]).arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn credgate");
        let lines = Arc::<Mutex<Vec<String>>>::default();
        let rx = collect_lines_held(child.stdout.take().expect("stdout"), lines.clone(), hold);
        let _stderr = collect_lines(child.stderr.take().expect("stderr"), lines.clone());
        (child, lines, rx)
    }

    /// Starts the binary on an already written config.
    pub fn spawn(dir: tempfile::TempDir, config: &Path, env: &[(String, String)]) -> Credgate {
        Self::spawn_held(dir, config, env, None)
    }

    fn spawn_held(
        dir: tempfile::TempDir,
        config: &Path,
        env: &[(String, String)],
        hold: Option<mpsc::Receiver<()>>,
    ) -> Credgate {
        let (child, lines, rx) = Self::start_serve(&dir, config, env, hold);
        let deadline = Instant::now() + STARTUP;
        let (tls_addr, admin_addr) = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(remaining).unwrap_or_else(|_| {
                panic!(
                    "credgate did not start; output:\n{}",
                    lines.lock().expect("lines").join("\n")
                )
            });
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["message"] == "credgate listening" {
                let addr = |k: &str| v[k].as_str().expect(k).parse().expect("addr");
                break (addr("tls_addr"), addr("admin_addr"));
            }
        };
        Credgate {
            tls_addr,
            admin_addr,
            dir,
            lines,
            child: Some(child),
        }
    }

    /// Starts the binary and waits until its admin port accepts connections.
    pub fn spawn_quiet(
        dir: tempfile::TempDir,
        config: &Path,
        env: &[(String, String)],
        tls_port: u16,
        admin_port: u16,
    ) -> Credgate {
        let (child, lines, _stdout) = Self::start_serve(&dir, config, env, None);
        let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let deadline = Instant::now() + STARTUP;
        while std::net::TcpStream::connect(admin_addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "credgate did not start; output:\n{}",
                lines.lock().expect("lines").join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Credgate {
            tls_addr: SocketAddr::from(([127, 0, 0, 1], tls_port)),
            admin_addr,
            dir,
            lines,
            child: Some(child),
        }
    }

    /// The process's resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Every line credgate wrote so far (stdout and stderr).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits (bounded: 15 s, three TLS reload periods) until a line
    /// satisfies `pred`.
    pub async fn wait_for_line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_line_within(what, Duration::from_secs(15), pred)
            .await
    }

    /// As [`Credgate::wait_for_line`], for up to `within`.
    pub async fn wait_for_line_within(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            for line in self.lines() {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && pred(&v)
                {
                    return v;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no log line for {what}; output:\n{}",
            self.lines().join("\n")
        );
    }

    /// The admin port's health status for the whole server ("").
    pub async fn admin_health(&self) -> Result<i32, tonic::Status> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = Channel::from_shared(format!("http://{}", self.admin_addr))
            .expect("uri")
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(2));
        HealthClient::new(channel)
            .check(request)
            .await
            .map(|r| r.into_inner().status)
    }

    /// Audit events so far.
    pub fn audit_events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "credgate::audit")
            .collect()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
        }
    }

    /// Waits (bounded) for the process to exit, without blocking the test's
    /// runtime (the OTLP receiver runs on it while credgate flushes).
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "credgate did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An mTLS channel presenting `client`'s certificate.
    pub async fn channel(
        &self,
        pki: &Pki,
        client: Option<&Issued>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca.cert_pem))
            .domain_name("localhost");
        if let Some(client) = client {
            // The whole chain: a client issued by an intermediate sends it.
            tls = tls.identity(Identity::from_pem(&client.chain_pem, &client.key_pem));
        }
        Channel::from_shared(format!("https://{}", self.tls_addr))
            .expect("uri")
            .tls_config(tls)?
            .connect()
            .await
    }

    /// Asserts that presenting `client` (or no certificate) gets no call
    /// through: the client sees a transport failure (with TLS 1.3 only at
    /// its first RPC) and credgate logs a rejected handshake whose error
    /// mentions `reason`.
    pub async fn expect_handshake_rejected(
        &self,
        pki: &Pki,
        client: Option<&Issued>,
        reason: &str,
    ) {
        if let Ok(channel) = self.channel(pki, client).await {
            let status = PasswordServiceClient::new(channel)
                .change_password(change("Any-pass-1", "Any-pass-2"))
                .await
                .expect_err("the handshake must fail");
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
                ),
                "{status:?}"
            );
        }
        self.wait_for_line("the handshake rejection", |v| {
            v["message"] == "TLS handshake rejected"
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.to_lowercase().contains(reason))
        })
        .await;
    }

    /// A PasswordService client presenting `client`'s certificate.
    pub async fn client(&self, pki: &Pki, client: &Issued) -> PasswordServiceClient<Channel> {
        PasswordServiceClient::new(self.channel(pki, Some(client)).await.expect("mTLS connect"))
    }
}

impl Drop for Credgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A ChangePassword request.
pub fn change(old: &str, new: &str) -> credgate::api::ChangePasswordRequest {
    credgate::api::ChangePasswordRequest {
        old_password: old.to_owned(),
        new_password: new.to_owned(),
        validate_only: false,
        request_id: String::new(),
    }
}

/// A ChangePassword request with a `request_id`.
pub fn change_with_id(old: &str, new: &str, id: &str) -> credgate::api::ChangePasswordRequest {
    credgate::api::ChangePasswordRequest {
        request_id: id.to_owned(),
        ..change(old, new)
    }
}

/// A fresh UUID for a `request_id`.
pub fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A request whose deadline reaches credgate only as `grpc-timeout`
/// metadata, so that the client itself does not give up first.
pub fn with_timeout<T>(message: T, grpc_timeout: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("grpc-timeout", grpc_timeout.parse().expect("header"));
    request
}

// ---------------------------------------------------------------- Redis

/// A real `redis-server` (Debian package) on a free 127.0.0.1 port,
/// persistence off, stopped on drop.
pub struct Redis {
    port: u16,
    child: Option<Child>,
    /// A config file given first (sentinels need one they can rewrite).
    config: Option<PathBuf>,
    /// Extra command-line options (cluster mode, replication).
    args: Vec<String>,
}

/// A free 127.0.0.1 port (probed; the OS may hand it out again later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None, &[])
    }

    /// `redis-server [config] --port P ... <args>` on a free port.
    pub fn start_with(config: Option<PathBuf>, args: &[&str]) -> Redis {
        Redis::start_on(free_port(), config, args)
    }

    /// As [`Redis::start_with`], on `port`.
    pub fn start_on(port: u16, config: Option<PathBuf>, args: &[&str]) -> Redis {
        let mut redis = Redis {
            port,
            child: None,
            config,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        redis.restart();
        redis
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to this server's process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port, waiting until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("redis-server");
        if let Some(config) = &self.config {
            cmd.arg(config);
        }
        let child = cmd
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server (Debian package redis-server; scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command on this server.
    pub async fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut conn = self.connection().await;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn).await
    }

    /// One `INFO` field of this server.
    pub async fn info(&self, section: &str, field: &str) -> Option<String> {
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.connection().await)
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_owned())
    }

    /// Kills the server (as a crash or partition would look to credgate).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Every key with a dump of its value (strings, sorted-set members and
    /// scores), for leak checks.
    pub async fn dump(&self) -> Vec<(String, String)> {
        let mut conn = self.connection().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("TYPE");
            let value = match kind.as_str() {
                "string" => redis::cmd("GET")
                    .arg(&key)
                    .query_async::<String>(&mut conn)
                    .await
                    .expect("GET"),
                "zset" => {
                    let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async(&mut conn)
                        .await
                        .expect("ZRANGE");
                    format!("{members:?}")
                }
                other => panic!("unexpected key type {other} for {key}"),
            };
            out.push((key, value));
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ErrorInfo of a failed call: (reason, metadata).
pub fn error_info(status: &tonic::Status) -> (String, HashMap<String, String>) {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "credgate");
    (info.reason.clone(), info.metadata.clone())
}

/// Asserts code and reason, returning the metadata.
pub fn expect_error(
    status: &tonic::Status,
    code: tonic::Code,
    reason: &str,
) -> HashMap<String, String> {
    let (got, metadata) = error_info(status);
    assert_eq!((status.code(), got.as_str()), (code, reason), "{status:?}");
    metadata
}

/// Writes `text` to the path, flushing (for files credgate re-reads).
pub fn rewrite(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    f.sync_all().expect("sync");
}

// ---------------------------------------------------------------- leaks

/// How `secret` appears in `text`, if it does: plain, hex (either case), or
/// inside `text` once decoded the ways a dependency could have encoded it —
/// percent-encoding of any character set and case (`%21`, `%20`, `%c3%a9`),
/// form encoding (`+` for a space), JSON and Rust escapes (`\u00e9`,
/// `\xc3\xa9`, `\"`), and Rust's Debug of a byte slice (`[76, 101, ...]`),
/// and combinations (an escaped, percent-encoded request body).
pub fn leak_of(text: &str, secret: &str) -> Option<String> {
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let needles = [
        ("plain", secret.to_owned()),
        ("hex", hex.clone()),
        ("HEX", hex.to_uppercase()),
    ];
    // A Debug string inside a JSON log line is escaped twice, and may be
    // escaped once more by whatever logged it.
    let mut layers = vec![("as written".to_owned(), text.to_owned())];
    for depth in 1..=3 {
        let unescaped = unescape(&layers[layers.len() - 1].1);
        layers.push((format!("unescaped {depth}x"), unescaped));
    }
    for i in 0..layers.len() {
        let listed = byte_lists(&layers[i].1);
        layers.push((format!("{}, from byte lists", layers[i].0), listed));
    }
    for (layer, hay) in &layers {
        let decoded = [
            ("", hay.clone()),
            (", percent-decoded", percent_decode(hay, false)),
            (", form-decoded", percent_decode(hay, true)),
        ];
        for (decoding, hay) in &decoded {
            for (form, needle) in &needles {
                if hay.contains(needle.as_str()) {
                    return Some(format!("{form} ({layer}{decoding})"));
                }
            }
        }
    }
    None
}

/// `%XX` as bytes (and `+` as a space when `form`), read as UTF-8.
fn percent_decode(text: &str, form: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if form => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JSON and Rust escapes undone: `\xHH` (a byte), `\uHHHH` and `\u{H..}`
/// (a character), `\"`, `\\`, `\n`, `\t`, `\r`.
fn unescape(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let push = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    while i < chars.len() {
        if chars[i] == '\\' && i + 1 < chars.len() {
            let hex_at = |from: usize, n: usize| -> Option<u32> {
                let s: String = chars.get(from..from + n)?.iter().collect();
                u32::from_str_radix(&s, 16).ok()
            };
            match chars[i + 1] {
                'x' => {
                    if let Some(b) = hex_at(i + 2, 2) {
                        out.push(b as u8);
                        i += 4;
                        continue;
                    }
                }
                'u' if chars.get(i + 2) == Some(&'{') => {
                    if let Some(end) = chars[i + 3..].iter().position(|&c| c == '}')
                        && let Some(c) = hex_at(i + 3, end).and_then(char::from_u32)
                    {
                        push(&mut out, c);
                        i += 4 + end;
                        continue;
                    }
                }
                'u' => {
                    if let Some(c) = hex_at(i + 2, 4).and_then(char::from_u32) {
                        push(&mut out, c);
                        i += 6;
                        continue;
                    }
                }
                '"' | '\\' | '\'' => {
                    push(&mut out, chars[i + 1]);
                    i += 2;
                    continue;
                }
                'n' => {
                    out.push(b'\n');
                    i += 2;
                    continue;
                }
                't' => {
                    out.push(b'\t');
                    i += 2;
                    continue;
                }
                'r' => {
                    out.push(b'\r');
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        push(&mut out, chars[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every run of at least eight comma-separated numbers 0..=255 (Rust's
/// Debug of a byte slice) replaced by those bytes, read as UTF-8.
fn byte_lists(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let mut j = i;
        let mut run = Vec::new();
        loop {
            let start = j;
            while j < bytes.len() && bytes[j].is_ascii_digit() && j - start < 3 {
                j += 1;
            }
            let Some(n) = std::str::from_utf8(&bytes[start..j])
                .ok()
                .and_then(|d| d.parse::<u16>().ok())
                .filter(|&n| n <= 255 && j > start)
            else {
                j = start;
                break;
            };
            run.push(n as u8);
            if bytes.get(j..j + 2) == Some(b", ") {
                j += 2;
            } else {
                break;
            }
        }
        if run.len() >= 8 && (i == 0 || !bytes[i - 1].is_ascii_digit()) {
            out.extend_from_slice(&run);
            i = j.max(i + 1);
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
